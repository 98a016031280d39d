//! The events stream as a test reads it: [`EventReader`] (a consumer from
//! the start of the stream that keeps what it read, by sender), and the
//! one-line summaries tests compare ([`task_story`], [`has`], ...).

use anyhow::Context;
use futures_lite::StreamExt;
use guildhall_broker::topology::{StreamStart, consume_stream};
use guildhall_proto::{AgentId, Envelope, Event, Names, TaskAbandoned};
use lapin::options::BasicAckOptions;
use lapin::{Channel, Connection};
use std::time::Duration;
use tokio::time::Instant;

/// Events read so far from the stream, with their senders.
pub struct EventReader {
    /// The channel the consumer is on.
    channel: Channel,
    /// The stream consumer, from the first offset.
    consumer: lapin::Consumer,
    /// Every event read: sender and event, in stream order.
    seen: Vec<(AgentId, Event)>,
    /// Every envelope read: sender and sequence number, in stream order.
    envelopes: Vec<(AgentId, u64)>,
}

impl EventReader {
    /// Starts reading the events stream of `names` from its start.
    pub async fn open(conn: &Connection, names: &Names) -> anyhow::Result<Self> {
        let channel = conn.create_channel().await?;
        let stream = names.events_stream();
        let consumer = consume_stream(&channel, &stream, "reader", StreamStart::First, 500)
            .await
            .with_context(|| format!("consume {stream}"))?;
        Ok(Self {
            channel,
            consumer,
            seen: Vec::new(),
            envelopes: Vec::new(),
        })
    }

    /// The next envelope on the stream, decoded (or why it could not be);
    /// `None` if none came within `wait`.
    pub async fn next_envelope(
        &mut self,
        wait: Duration,
    ) -> anyhow::Result<Option<anyhow::Result<Envelope>>> {
        let delivery = match tokio::time::timeout(wait, self.consumer.next()).await {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => anyhow::bail!("the events consumer was cancelled"),
            Err(_) => return Ok(None),
        };
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(Some(
            guildhall_proto::decode(&delivery.data)
                .map(|d| d.envelope)
                .map_err(anyhow::Error::from),
        ))
    }

    /// Reads until `done` holds for the events of `agent` (waiting up to
    /// 15 s), returning them.
    pub async fn until(
        &mut self,
        agent: &AgentId,
        what: &str,
        done: impl Fn(&[Event]) -> bool,
    ) -> Vec<Event> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mine: Vec<Event> = self
                .seen
                .iter()
                .filter(|(sender, _)| sender == agent)
                .map(|(_, e)| e.clone())
                .collect();
            if done(&mine) {
                return mine;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let envelope = match self.next_envelope(left).await {
                Ok(Some(decoded)) => decoded.expect("an envelope the agent wrote"),
                Ok(None) => panic!("timed out waiting for {what}; events: {mine:#?}"),
                Err(e) => panic!("reading events for {what}: {e:#}"),
            };
            let sender = envelope.sender.clone();
            self.envelopes.push((sender.clone(), envelope.seq));
            self.seen
                .extend(envelope.events.into_iter().map(|e| (sender.clone(), e)));
        }
    }

    /// Reads until the story of `task` (as [`task_story`] tells it) among
    /// `agent`'s events reaches `step` (`succeeded#1`, ...), returning
    /// `agent`'s events.
    pub async fn until_step(&mut self, agent: &AgentId, task: &str, step: &str) -> Vec<Event> {
        let what = format!("{task} to reach {step}");
        self.until(agent, &what, |e| {
            task_story(e, task).iter().any(|s| s == step)
        })
        .await
    }

    /// Checks that `agent`'s envelopes arrived in sequence order, with
    /// nothing missing: each is the next number or a resend of one already
    /// seen (a batch whose confirm was lost). Returns the highest.
    pub fn assert_sequence(&self, agent: &AgentId) -> u64 {
        let seqs: Vec<u64> = self
            .envelopes
            .iter()
            .filter(|(sender, _)| sender == agent)
            .map(|(_, seq)| *seq)
            .collect();
        let mut last = 0;
        for &seq in &seqs {
            assert!(
                seq == last + 1 || seq <= last,
                "envelope {seq} after {last}: {seqs:?}"
            );
            last = last.max(seq);
        }
        last
    }

    /// Stops reading.
    pub async fn close(self) {
        let _ = self.channel.close(200, "read".into()).await;
    }
}

/// The kinds of the events about `task`, in order, with their attempts
/// (`started#1`, `failed#1:exit_3`, `abandoned#1:connection lost`, ...).
pub fn task_story(events: &[Event], task: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.task_id().is_some_and(|t| t.as_str() == task))
        .map(|e| match e {
            Event::TaskStarted(s) => format!("started#{}", s.attempt),
            Event::TaskSucceeded(s) => format!("succeeded#{}", s.attempt),
            Event::TaskFailed(f) => format!("failed#{}:{}", f.attempt, f.error_class),
            Event::TaskRetrying(r) => format!("retrying#{}", r.attempt),
            Event::TaskDeadLettered(d) => format!("dead#{}", d.attempt),
            Event::TaskAbandoned(a) => format!("abandoned#{}:{}", a.attempt, a.reason),
            other => other.kind().to_owned(),
        })
        .collect()
}

/// The kinds of `events` in order, heartbeats left out.
pub fn kinds_but_heartbeats(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .map(Event::kind)
        .filter(|k| *k != "heartbeat")
        .collect()
}

/// Whether an event of `kind` is among `events`.
pub fn has(events: &[Event], kind: &str) -> bool {
    events.iter().any(|e| e.kind() == kind)
}

/// The `TaskAbandoned` events among `events`.
pub fn abandoned(events: &[Event]) -> Vec<TaskAbandoned> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::TaskAbandoned(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

/// Whether a `TaskStarted` for `task` says it was redelivered.
pub fn redelivered(events: &[Event], task: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::TaskStarted(s) if s.task_id.as_str() == task && s.redelivered))
}

/// Tasks of `stage` started and not yet settled, from one agent's events.
pub fn stage_in_hand(events: &[Event], stage: &str) -> usize {
    let (mut started, mut settled) = (0usize, 0usize);
    for event in events {
        match event {
            Event::TaskStarted(e) if e.stage.as_str() == stage => started += 1,
            Event::TaskSucceeded(e) if e.stage.as_str() == stage => settled += 1,
            Event::TaskFailed(e) if e.stage.as_str() == stage => settled += 1,
            Event::TaskAbandoned(e) if e.stage.as_str() == stage => settled += 1,
            _ => {}
        }
    }
    started.saturating_sub(settled)
}
