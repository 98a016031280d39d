//! The index of stored flow results (issue 19).
//!
//! An agent stores a fan-out child's result over
//! `flow::MAX_INLINE_RESULT` in the `<ns>.results` stream (message id = the
//! child's id), confirmed, before it writes the `TaskResult` that carries
//! the result's SHA-256; the join's payload refers to it by id and digest.
//! A stream cannot be searched by id, so this task follows the stream from
//! its start and keeps, per (child id, SHA-256 of the body), the offset the
//! body is at: `GET /api/results/{id}` then reads that one message
//! ([`read_at`]). The digest is computed here from the bytes, so a forged
//! message under a child's id can only ever be found under its own digest,
//! never under the one its agent reported.
//!
//! The index is not in snapshots: a restarted coordinator reads the
//! stream again (bounded by its retention) and answers 503 for a result it
//! has not reached yet ([`Lookup::NotYet`]). It keeps at most
//! [`MAX_INDEXED`] entries (oldest offsets go first); messages of
//! `flow::MAX_INLINE_RESULT` bytes or fewer, or without a valid task id as
//! message id, are not results and are skipped (counted in
//! [`ResultsIndex::skipped`]).
//!
//! **This is not on the task data path**: a join is released whatever the
//! index holds; only readers of the references wait for it.

use super::App;
use super::ingest::{IngestError, offset_of};
use futures_lite::StreamExt;
use guildhall_broker::topology::{
    StreamRetention, StreamStart, consume_stream, ensure_results_stream,
};
use guildhall_broker::{AmqpUrls, connect_any};
use guildhall_proto::TaskId;
use guildhall_proto::flow::MAX_INLINE_RESULT;
use lapin::options::BasicAckOptions;
use lapin::{Channel, Connection};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Most results indexed at once (about 200 bytes each); past it the oldest
/// offsets are forgotten. The stream's default retention (2 GB) holds at
/// most about 30,000 results over the inline limit.
pub const MAX_INDEXED: usize = 200_000;

/// Credit of the index's stream consumer: each message is at least 64 KiB
/// and may be much larger, so only a few at a time.
const PREFETCH: u16 = 8;

/// Longest wait between reconnections.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Where one stored result is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Its offset in the results stream.
    pub offset: u64,
    /// Its size.
    pub bytes: u64,
}

/// What the index says about a (child, digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// At this offset.
    Found(Stored),
    /// Not indexed, and the index has not read the stream to its end yet.
    NotYet,
    /// Not in the stream (never stored, forged digest, or gone with the
    /// stream's retention).
    Missing,
}

/// The index, shared by the follower and the route.
#[derive(Debug, Default)]
pub struct ResultsIndex {
    /// The entries, and their order by offset (for the cap).
    inner: Mutex<Inner>,
    /// Whether the follower has read the stream up to where it ended when
    /// the follower (last) attached.
    caught_up: AtomicBool,
    /// Messages that were not results (too small, no valid id).
    skipped: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    /// (child, SHA-256) to where the body is.
    by_key: HashMap<(TaskId, [u8; 32]), Stored>,
    /// Offset to key, to forget the oldest first.
    by_offset: BTreeMap<u64, (TaskId, [u8; 32])>,
}

impl ResultsIndex {
    /// Remembers that `id`'s result with `digest` is at `offset` (a later
    /// copy, from a redelivered task, replaces an earlier one).
    pub fn insert(&self, offset: u64, id: TaskId, digest: [u8; 32], bytes: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (id, digest);
        if let Some(old) = inner.by_key.insert(key.clone(), Stored { offset, bytes }) {
            inner.by_offset.remove(&old.offset);
        }
        inner.by_offset.insert(offset, key);
        while inner.by_key.len() > MAX_INDEXED {
            let Some((_, oldest)) = inner.by_offset.pop_first() else {
                break;
            };
            inner.by_key.remove(&oldest);
        }
    }

    /// Where `id`'s result with `digest` is.
    pub fn find(&self, id: &TaskId, digest: &[u8; 32]) -> Lookup {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.by_key.get(&(id.clone(), *digest)) {
            Some(s) => Lookup::Found(*s),
            None if self.caught_up.load(Ordering::Relaxed) => Lookup::Missing,
            None => Lookup::NotYet,
        }
    }

    /// Results indexed.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages of the stream that were not results.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Whether the follower has reached the stream's end once.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// Takes one message of the stream: indexed if it is a result.
    fn take(&self, offset: u64, message_id: Option<&str>, body: &[u8]) -> bool {
        let id = message_id.and_then(|m| TaskId::new(m).ok());
        match id {
            Some(id) if body.len() > MAX_INLINE_RESULT => {
                let digest: [u8; 32] = Sha256::digest(body).into();
                self.insert(offset, id, digest, body.len() as u64);
                true
            }
            _ => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Follows the results stream into `app.results` until `stop` flips,
/// reconnecting with backoff.
pub async fn run(app: Arc<App>, url: AmqpUrls, conn_name: String, mut stop: watch::Receiver<bool>) {
    let mut next_offset: Option<u64> = None;
    let mut backoff = Duration::from_millis(200);
    // The broker address connected to last: tried last by a reconnect.
    let mut address: Option<usize> = None;
    loop {
        match follow(
            &app,
            &url,
            &conn_name,
            &mut next_offset,
            &mut stop,
            &mut backoff,
            &mut address,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!("results stream index: {e}; reconnecting in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn follow(
    app: &App,
    url: &AmqpUrls,
    conn_name: &str,
    next_offset: &mut Option<u64>,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
    address: &mut Option<usize>,
) -> Result<(), IngestError> {
    let index = &app.results;
    let (conn, connected) = connect_any(url, conn_name, *address).await?;
    *address = Some(connected);
    ensure_results_stream(&conn, &app.names, &StreamRetention::default()).await?;
    let stream = app.names.results_stream();
    // Where the stream ends now: reaching it is being caught up.
    let end = last_offset(&conn, &stream).await?;
    if end.is_none_or(|e| next_offset.is_some_and(|n| n > e)) {
        index.caught_up.store(true, Ordering::Relaxed);
    }
    let channel = conn.create_channel().await?;
    let start = next_offset.map_or(StreamStart::First, StreamStart::Offset);
    let mut consumer = consume_stream(
        &channel,
        &stream,
        "guildhall-results-index",
        start,
        PREFETCH,
    )
    .await?;
    *backoff = Duration::from_millis(200);
    tracing::info!(%stream, from = ?next_offset, "indexing stored flow results");
    loop {
        tokio::select! {
            delivery = consumer.next() => {
                let delivery = match delivery {
                    Some(d) => d?,
                    None => return Err(IngestError::Cancelled),
                };
                let offset = offset_of(&delivery);
                if let Some(o) = offset
                    && next_offset.is_none_or(|n| o >= n)
                {
                    let id = delivery.properties.message_id().as_ref().map(|m| m.to_string());
                    let body = delivery.data;
                    // Hashing a large body is CPU work: off the runtime.
                    let app_index = app.results.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        app_index.take(o, id.as_deref(), &body)
                    })
                    .await;
                    *next_offset = Some(o + 1);
                    if end.is_some_and(|e| o >= e) {
                        index.caught_up.store(true, Ordering::Relaxed);
                    }
                }
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            _ = stop.changed() => {
                let _ = conn.close(200, "shutting down".into()).await;
                return Ok(());
            }
        }
    }
}

/// The offset of the stream's last message, or `None` if it is empty:
/// read from its last chunk (and what arrives for a moment after).
async fn last_offset(conn: &Connection, stream: &str) -> Result<Option<u64>, lapin::Error> {
    let channel = conn.create_channel().await?;
    let mut consumer = consume_stream(
        &channel,
        stream,
        "guildhall-results-probe",
        StreamStart::Last,
        PREFETCH,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = None;
    // An empty stream delivers nothing: wait a little for the first
    // delivery, then only while more keep coming.
    let mut wait = Duration::from_secs(1);
    loop {
        let until = deadline.min(Instant::now() + wait);
        let delivery = match tokio::time::timeout_at(until, consumer.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) | Err(_) => break,
        };
        let seen = offset_of(&delivery);
        delivery
            .acker
            .ack(BasicAckOptions { multiple: true })
            .await?;
        last = last.max(seen);
        wait = Duration::from_millis(200);
    }
    let _ = channel.close(200, "probed".into()).await;
    Ok(last)
}

/// What [`read_at`] found.
#[derive(Debug)]
pub enum Read {
    /// The message at the offset asked for: its id and body.
    Message {
        /// Its message id.
        message_id: Option<String>,
        /// Its body.
        body: Vec<u8>,
    },
    /// The stream no longer holds that offset (retention): its first
    /// message is later.
    Gone,
    /// Nothing came by the deadline.
    TimedOut,
}

/// Reads the one message at `offset` of `stream`, on a channel of its own,
/// by `deadline`.
pub async fn read_at(
    conn: &Connection,
    stream: &str,
    offset: u64,
    deadline: Instant,
) -> Result<Read, lapin::Error> {
    let channel: Channel = conn.create_channel().await?;
    let read = async {
        let mut consumer = consume_stream(
            &channel,
            stream,
            "guildhall-results-read",
            StreamStart::Offset(offset),
            1,
        )
        .await?;
        // A stream consumer starts at the chunk holding the offset: skip
        // what comes before it in that chunk.
        loop {
            let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(d)) => d?,
                Ok(None) | Err(_) => return Ok(Read::TimedOut),
            };
            let at = offset_of(&delivery);
            delivery.acker.ack(BasicAckOptions::default()).await?;
            match at {
                Some(o) if o == offset => {
                    return Ok(Read::Message {
                        message_id: delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|m| m.to_string()),
                        body: delivery.data,
                    });
                }
                Some(o) if o > offset => return Ok(Read::Gone),
                _ => {}
            }
        }
    };
    let result = read.await;
    let _ = channel.close(200, "read".into()).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid(s: &str) -> TaskId {
        TaskId::new(s).unwrap()
    }

    #[test]
    fn results_are_found_by_id_and_the_digest_of_their_bytes() {
        let index = ResultsIndex::default();
        let body = vec![7u8; MAX_INLINE_RESULT + 1];
        let digest: [u8; 32] = Sha256::digest(&body).into();
        assert_eq!(index.find(&tid("P:0"), &digest), Lookup::NotYet);
        assert!(index.take(5, Some("P:0"), &body));
        index.caught_up.store(true, Ordering::Relaxed);
        assert_eq!(
            index.find(&tid("P:0"), &digest),
            Lookup::Found(Stored {
                offset: 5,
                bytes: body.len() as u64
            })
        );
        // Another id, or another digest (a forged message under the same
        // id is found only under its own): missing.
        assert_eq!(index.find(&tid("P:1"), &digest), Lookup::Missing);
        assert_eq!(index.find(&tid("P:0"), &[0; 32]), Lookup::Missing);
        let mut forged = body.clone();
        forged[0] = 8;
        assert!(index.take(6, Some("P:0"), &forged));
        assert_eq!(
            index.find(&tid("P:0"), &digest),
            Lookup::Found(Stored {
                offset: 5,
                bytes: body.len() as u64
            })
        );
        // A redelivered task's second copy replaces the first.
        assert!(index.take(9, Some("P:0"), &body));
        assert!(matches!(index.find(&tid("P:0"), &digest), Lookup::Found(s) if s.offset == 9));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn messages_that_are_not_results_are_skipped_and_counted() {
        let index = ResultsIndex::default();
        assert!(!index.take(0, Some("P:0"), b"small"));
        assert!(!index.take(1, None, &vec![0; MAX_INLINE_RESULT + 1]));
        assert!(!index.take(2, Some("not an id!"), &vec![0; MAX_INLINE_RESULT + 1]));
        assert_eq!((index.len(), index.skipped()), (0, 3));
    }

    #[test]
    fn the_oldest_offsets_are_forgotten_past_the_cap() {
        let index = ResultsIndex::default();
        for i in 0..(MAX_INDEXED as u64 + 3) {
            let mut digest = [0u8; 32];
            digest[..8].copy_from_slice(&i.to_le_bytes());
            index.insert(i, tid("P:0"), digest, 1);
        }
        index.caught_up.store(true, Ordering::Relaxed);
        assert_eq!(index.len(), MAX_INDEXED);
        let mut first = [0u8; 32];
        first[..8].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(index.find(&tid("P:0"), &first), Lookup::Missing);
        let mut last = [0u8; 32];
        last[..8].copy_from_slice(&(MAX_INDEXED as u64 + 2).to_le_bytes());
        assert!(matches!(index.find(&tid("P:0"), &last), Lookup::Found(_)));
    }
}
