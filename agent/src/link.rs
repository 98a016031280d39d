//! The agent's link to the broker: one connection with everything the agent
//! declared on it, how its loss is noticed, and the backoff between
//! reconnects.
//!
//! A link is opened at start and again after every loss, and each opening
//! declares everything from scratch (nothing is remembered from the last
//! connection, since the broker may have restarted without its queues): the
//! stage and the default next stage, the control exchange, the events stream
//! if it is missing, the agent's exclusive command queue and its bindings.
//! It then opens the confirm channels for task messages and for events, and
//! the channel the stage is consumed on.
//!
//! A link is **lost** when its connection or one of those long-lived
//! channels closes: the broker closed the connection (the coordinator closes
//! a frozen agent's, an operator restarted RabbitMQ), the network failed
//! (noticed by the AMQP heartbeat), or the broker closed a channel (a
//! consumer timeout). The runner is told by [`Watch::lost`], which follows the
//! connection's error events and checks the channels every second. Every
//! delivery received on a lost link belongs to a dead channel: the broker
//! has requeued it (or will, once the runner closes the connection), so it
//! can be neither acked nor nacked; [`TaskLink::is_lost`] tells its handler.
//!
//! [`is_fatal`] sorts out the errors no retry can fix (a declaration refused
//! with `PRECONDITION_FAILED`, refused credentials or permissions, a missing
//! virtual host); every other failure to reconnect is retried forever with
//! [`Backoff`].

use crate::control::ControlQueue;
use crate::declare::Declarer;
use futures_lite::{Stream, StreamExt};
use guildhall_broker::topology::{
    StreamRetention, declare_control, declare_stage, ensure_events_stream,
};
use guildhall_broker::{AmqpUrls, BrokerError, Publisher, connect_any};
use guildhall_proto::{AgentId, Names, Stage};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::{Channel, Connection};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// How often the long-lived channels are checked, besides the connection's
/// error events.
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(1);

/// Longest a connection close waits for the broker's answer.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// First reconnect delay (before jitter).
const BACKOFF_START: Duration = Duration::from_millis(200);

/// Cap on the reconnect delay (before jitter).
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The link to the broker was lost; the reason is one line.
#[derive(Debug)]
pub(crate) struct Lost(pub String);

impl Lost {
    /// What failed and the error.
    pub(crate) fn new(what: &str, reason: impl std::fmt::Display) -> Self {
        Lost(format!(
            "{what}: {}",
            crate::config::one_line(&reason.to_string())
        ))
    }
}

/// What opening a link needs.
#[derive(Debug, Clone)]
pub(crate) struct LinkParams {
    /// The broker's addresses.
    pub url: AmqpUrls,
    /// Broker names of the namespace.
    pub names: Names,
    /// The agent, for the connection name and its command queue.
    pub id: AgentId,
    /// The stage consumed.
    pub stage: Stage,
    /// The default next stage, declared up front.
    pub next: Option<Stage>,
}

/// One connection and what the agent opened on it.
pub(crate) struct Link {
    /// The connection.
    pub conn: Arc<Connection>,
    /// The channel the stage is consumed on (acks go through it).
    pub consume_channel: Channel,
    /// The stage's band consumers while consuming.
    pub consumer: Option<crate::bands::Bands>,
    /// The stage's intake mover while consuming.
    pub intake: Option<crate::intake::Mover>,
    /// Commands from the control exchange.
    pub control: ControlQueue,
    /// What task handlers use of this link.
    pub tasks: Arc<TaskLink>,
    /// Notices the loss of the link.
    pub watch: Watch,
    /// Index in [`LinkParams::url`] of the address connected to: tried
    /// last by the next reconnect.
    pub address: usize,
}

/// Follows a link's connection and long-lived channels.
pub(crate) struct Watch {
    /// The connection.
    conn: Arc<Connection>,
    /// The long-lived channels, by what they are for.
    channels: Vec<(&'static str, Channel)>,
    /// The connection's events (errors among them).
    conn_events: Pin<Box<dyn Stream<Item = lapin::Event> + Send>>,
    /// Ticks the channel checks.
    watchdog: tokio::time::Interval,
}

/// The part of a link that task handlers hold: everything a delivery needs
/// until it is settled, on the connection it came from.
#[derive(Debug)]
pub struct TaskLink {
    /// Confirm-mode channel for results, retries, dead letters and replies.
    pub publisher: Publisher,
    /// Declarations of next stages and retry queues, fresh for each link.
    pub declarer: Declarer,
    /// The connection's negotiated largest frame: a message's properties
    /// must fit in one, or the broker closes the connection (a dead letter
    /// adds headers to a producer's, see [`crate::dead`]).
    pub frame_max: u32,
    /// The channel deliveries came on: no ack is possible once it is closed.
    consume_channel: Channel,
    /// Cancelled by the runner when the link is lost.
    lost: CancellationToken,
}

impl TaskLink {
    /// Whether deliveries of this link can no longer be acked or nacked.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled() || !self.consume_channel.status().connected()
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("connected", &self.conn.status().connected())
            .field("consuming", &self.consumer.is_some())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Connects to one of the broker's addresses (`last`, that of a link
    /// just lost, tried last) and declares everything; returns the link and
    /// the confirm channel for the event publisher. On error nothing stays
    /// open.
    pub async fn open(
        params: &LinkParams,
        last: Option<usize>,
    ) -> Result<(Self, Publisher), BrokerError> {
        let name = params.names.agent_connection_name(&params.id);
        let (conn, address) = connect_any(&params.url, &name, last).await?;
        let conn = Arc::new(conn);
        match Self::set_up(conn.clone(), params).await {
            Ok((mut link, events)) => {
                link.address = address;
                Ok((link, events))
            }
            Err(err) => {
                close(&conn, "set-up failed").await;
                Err(err)
            }
        }
    }

    async fn set_up(
        conn: Arc<Connection>,
        params: &LinkParams,
    ) -> Result<(Self, Publisher), BrokerError> {
        let names = &params.names;
        declare_stage(&conn, names, &params.stage).await?;
        if let Some(next) = &params.next {
            declare_stage(&conn, names, next).await?;
        }
        declare_control(&conn, names).await?;
        ensure_events_stream(&conn, names, &StreamRetention::default()).await?;
        let publisher = Publisher::open(&conn).await?;
        let events = Publisher::open(&conn).await?;
        let control = ControlQueue::open(&conn, names, &params.id, &params.stage).await?;
        let consume_channel = open_channel(&conn, "stage consumer").await?;
        let mut stages = vec![&params.stage];
        stages.extend(params.next.as_ref());
        let tasks = Arc::new(TaskLink {
            publisher,
            declarer: Declarer::new(conn.clone(), names.clone(), &stages),
            frame_max: conn.configuration().frame_max(),
            consume_channel: consume_channel.clone(),
            lost: CancellationToken::new(),
        });
        let mut watchdog = tokio::time::interval(WATCHDOG_INTERVAL);
        watchdog.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let watch = Watch {
            conn: conn.clone(),
            channels: vec![
                ("stage consumer", consume_channel.clone()),
                ("task publish", tasks.publisher.channel().clone()),
                ("event publish", events.channel().clone()),
                ("command", control.channel().clone()),
            ],
            conn_events: Box::pin(conn.events_listener()),
            watchdog,
        };
        let link = Self {
            conn,
            consume_channel,
            consumer: None,
            intake: None,
            control,
            tasks,
            watch,
            address: 0,
        };
        Ok((link, events))
    }

    /// Marks the link lost for its task handlers.
    pub fn mark_lost(&self) {
        self.tasks.lost.cancel();
    }
}

impl Watch {
    /// Resolves with the reason once the link is lost.
    pub async fn lost(&mut self) -> String {
        loop {
            tokio::select! {
                event = self.conn_events.next() => match event {
                    // A refused declaration on a short-lived channel is an
                    // error event too: only a closed connection or one of
                    // the long-lived channels counts.
                    Some(lapin::Event::Error(err)) => {
                        if self.broken().is_some() {
                            return crate::config::one_line(&err.to_string());
                        }
                    }
                    Some(_) => {}
                    None => {
                        return self.broken().unwrap_or_else(|| "the connection ended".into())
                    }
                },
                _ = self.watchdog.tick() => {
                    if let Some(reason) = self.broken() {
                        return reason;
                    }
                }
            }
        }
    }

    /// What is closed, if anything.
    fn broken(&self) -> Option<String> {
        if !self.conn.status().connected() {
            return Some("the connection closed".into());
        }
        self.channels
            .iter()
            .find(|(_, channel)| !channel.status().connected())
            .map(|(what, _)| format!("the {what} channel closed"))
    }
}

/// Closes a connection, waiting at most [`CLOSE_GRACE`] for the broker.
pub(crate) async fn close(conn: &Connection, reason: &str) {
    match tokio::time::timeout(CLOSE_GRACE, conn.close(200, reason.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!("closing the connection: {err}"),
        Err(_) => tracing::debug!("the broker did not confirm the connection close"),
    }
}

async fn open_channel(conn: &Connection, what: &str) -> Result<Channel, BrokerError> {
    conn.create_channel()
        .await
        .map_err(|source| BrokerError::Amqp {
            what: format!("open the {what} channel"),
            source,
        })
}

/// Whether retrying cannot fix `err`: the broker refused a declaration's
/// arguments (`PRECONDITION_FAILED`), the credentials or a permission
/// (`ACCESS_REFUSED`), or the virtual host (`NOT_ALLOWED`, `INVALID_PATH`),
/// or speaks another protocol. Everything else (refused or reset
/// connections, timeouts, a command queue still held by the previous
/// connection) may pass.
pub(crate) fn is_fatal(err: &BrokerError) -> bool {
    let source = match err {
        BrokerError::InvalidUrl { .. } | BrokerError::InvalidUrlList(_) => return true,
        BrokerError::ConnectTimeout { .. } => return false,
        // Credentials, permissions and virtual hosts are the cluster's: one
        // node refusing them is enough.
        BrokerError::ConnectAny(failures) => return failures.iter().any(is_fatal),
        BrokerError::Connect { source, .. } | BrokerError::Amqp { source, .. } => source,
    };
    match source.kind() {
        lapin::ErrorKind::InvalidProtocolVersion(_) => true,
        lapin::ErrorKind::ProtocolError(e) => matches!(
            e.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH)
        ),
        _ => false,
    }
}

/// Delays between reconnect attempts: exponential from 200 ms, doubling up
/// to 30 s, with equal jitter (half the delay fixed, half random), so a fleet
/// that lost the broker at once does not come back at once.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// The next delay before jitter.
    next: Duration,
}

impl Backoff {
    /// A backoff at its first step.
    pub fn new() -> Self {
        Self {
            next: BACKOFF_START,
        }
    }

    /// The delay before the next attempt; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(BACKOFF_MAX);
        let half = base / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Back to the first step (after a successful reconnect).
    pub fn reset(&mut self) {
        self.next = BACKOFF_START;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    fn amqp(kind: AMQPErrorKind) -> BrokerError {
        BrokerError::Amqp {
            what: "declare queue x".into(),
            source: lapin::ErrorKind::ProtocolError(AMQPError::new(kind, "test".into())).into(),
        }
    }

    #[test]
    fn only_refusals_no_retry_can_fix_are_fatal() {
        let fatal: [AMQPErrorKind; 4] = [
            AMQPSoftError::PRECONDITIONFAILED.into(),
            AMQPSoftError::ACCESSREFUSED.into(),
            AMQPHardError::NOTALLOWED.into(),
            AMQPHardError::INVALIDPATH.into(),
        ];
        for fatal in fatal {
            assert!(is_fatal(&amqp(fatal.clone())), "{fatal:?}");
        }
        let transient: [AMQPErrorKind; 4] = [
            AMQPSoftError::RESOURCELOCKED.into(),
            AMQPSoftError::NOTFOUND.into(),
            AMQPHardError::CONNECTIONFORCED.into(),
            AMQPHardError::RESOURCEERROR.into(),
        ];
        for transient in transient {
            assert!(!is_fatal(&amqp(transient.clone())), "{transient:?}");
        }
        let refused = BrokerError::Connect {
            url: "amqp://h".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
        };
        assert!(!is_fatal(&refused));
    }

    #[test]
    fn the_backoff_doubles_with_jitter_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new();
        let mut base = BACKOFF_START;
        for _ in 0..12 {
            let delay = backoff.next_delay();
            assert!(
                delay >= base / 2 && delay <= base,
                "{delay:?} outside {base:?}/2..={base:?}"
            );
            base = (base * 2).min(BACKOFF_MAX);
        }
        assert_eq!(base, BACKOFF_MAX);
        assert!(backoff.next_delay() >= BACKOFF_MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_START);
    }
}
