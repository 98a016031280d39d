//! [`Broker`]: a test's own connection to RabbitMQ, in its namespace: declare
//! stages, publish tasks, take and drain messages, probe queues, send agents
//! commands, read the events stream, and act on agents' connections through
//! the management API the way the coordinator does.

use crate::events::EventReader;
use crate::{TestNs, amqp_url, eventually, management};
use futures_lite::StreamExt;
use guildhall_broker::task::TaskMeta;
use guildhall_broker::{AmqpUrl, Publisher, connect, now_ms};
use guildhall_proto::command::{decode as decode_reply, encode as encode_command};
use guildhall_proto::{AgentId, Command, CommandMessage, CommandReply, Names, TaskId};
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use std::time::Duration;

/// Messages waiting in the delay ladder of `names` on `conn`: the ready
/// messages of its level queues, summed (a level not declared counts 0).
pub async fn ladder_ready(conn: &lapin::Connection, names: &Names) -> anyhow::Result<u32> {
    let mut total = 0;
    for level in 0..guildhall_proto::schedule::DELAY_LEVELS {
        let q = names.delay_level(level);
        if let Some(p) = guildhall_broker::topology::probe_queue(conn, &q).await? {
            total += p.ready;
        }
    }
    Ok(total)
}

/// A broker connection for a test, with a confirm-mode publisher.
pub struct Broker {
    /// The connection.
    pub conn: lapin::Connection,
    /// Publisher.
    pub publisher: Publisher,
    /// A plain channel (declarations, gets, deletes).
    pub channel: Channel,
    /// Names of the test's namespace.
    pub names: Names,
}

impl Broker {
    /// Connects for `ns`.
    pub async fn connect(ns: &TestNs) -> anyhow::Result<Self> {
        Self::connect_to(ns, &amqp_url()).await
    }

    /// Connects for `ns` to the broker at `url` (a private node).
    pub async fn connect_to(ns: &TestNs, url: &str) -> anyhow::Result<Self> {
        let url = AmqpUrl::parse(url)?;
        let conn = connect(&url, &format!("guildhall-test/{}", ns.name())).await?;
        let publisher = Publisher::open(&conn).await?;
        let channel = conn.create_channel().await?;
        Ok(Self {
            conn,
            publisher,
            channel,
            names: ns.names.clone(),
        })
    }

    /// Declares the namespace's events stream (as the coordinator would), so
    /// that a reader can start before the first agent.
    pub async fn ensure_events_stream(&self) -> anyhow::Result<()> {
        guildhall_broker::topology::ensure_events_stream(
            &self.conn,
            &self.names,
            &guildhall_broker::topology::StreamRetention::default(),
        )
        .await?;
        Ok(())
    }

    /// Declares a stage (queue, bindings, dead-letter queue).
    pub async fn declare_stage(&self, stage: &str) -> anyhow::Result<()> {
        guildhall_broker::topology::declare_stage(&self.conn, &self.names, &TestNs::stage(stage))
            .await?;
        Ok(())
    }

    /// Publishes a task to `stage` the way a producer outside Guildhall would:
    /// no `TaskSubmitted` event.
    pub async fn publish_task(&self, stage: &str, id: &str, payload: &str) -> anyhow::Result<()> {
        self.publish_traced(stage, id, payload.as_bytes(), None)
            .await
    }

    /// Publishes a task to `stage` with a `traceparent`, as a traced
    /// producer would.
    pub async fn publish_traced(
        &self,
        stage: &str,
        id: &str,
        payload: &[u8],
        traceparent: Option<&str>,
    ) -> anyhow::Result<()> {
        let meta = TaskMeta::submission(TaskId::new(id)?, now_ms(), traceparent.map(Into::into));
        self.publisher
            .publish(
                &self.names.tasks_exchange(),
                stage,
                payload,
                meta.properties(),
            )
            .await?;
        Ok(())
    }

    /// Publishes raw bytes to the events stream.
    pub async fn publish_raw_event(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.publisher
            .publish(
                "",
                &self.names.events_stream(),
                bytes,
                lapin::BasicProperties::default(),
            )
            .await?;
        Ok(())
    }

    /// Ready messages and consumers of a queue (`None` if it does not exist).
    /// A stage's intake queue (`<ns>.stage.<stage>`) counts its band queues
    /// too: a stage's queued tasks are in either (ready messages summed, the
    /// most consumers of any). Panics if the broker does not answer: inside
    /// [`eventually`], use [`Broker::try_probe`].
    pub async fn probe(&self, queue: &str) -> Option<(u32, u32)> {
        self.try_probe(queue).await.expect("probe a queue")
    }

    /// [`Broker::probe`], an error if the broker does not answer (RabbitMQ
    /// 3.10 answers a probe of a quorum queue whose Raft member is still
    /// starting with a channel error, `noproc`).
    pub async fn try_probe(&self, queue: &str) -> anyhow::Result<Option<(u32, u32)>> {
        let mut total: Option<(u32, u32)> = None;
        for q in self.with_bands(queue) {
            let probed = guildhall_broker::topology::probe_queue(&self.conn, &q)
                .await?
                .map(|p| (p.ready, p.consumers));
            if let Some((ready, consumers)) = probed {
                let (r, c) = total.unwrap_or((0, 0));
                total = Some((r + ready, c.max(consumers)));
            }
        }
        Ok(total)
    }

    /// Messages waiting in the delay ladder: the ready messages of its
    /// level queues, summed (see [`ladder_ready`]).
    pub async fn ladder_ready(&self) -> anyhow::Result<u32> {
        ladder_ready(&self.conn, &self.names).await
    }

    /// `queue`, and if it is a stage's intake, its band queues after it. A
    /// name ending in a band's suffix (`.p0-3`, `.p4-6`, `.p7-9`) is a band
    /// queue itself (stage names have no dots).
    fn with_bands(&self, queue: &str) -> Vec<String> {
        let mut all = vec![queue.to_owned()];
        let intake = format!("{}stage.", self.names.prefix());
        let is_band = guildhall_proto::Band::ALL
            .iter()
            .any(|b| queue.ends_with(&format!(".p{}", b.label())));
        if !is_band
            && let Some(stage) = queue.strip_prefix(&intake)
            && let Ok(stage) = guildhall_proto::Stage::new(stage)
        {
            for band in guildhall_proto::Band::ALL {
                all.push(self.names.band_queue(&stage, band));
            }
        }
        all
    }

    /// Takes one message from `queue` (for a stage's intake, from it or any
    /// of its bands), waiting up to 15 s for it.
    pub async fn take(&self, queue: &str) -> BasicGetMessage {
        eventually(
            Duration::from_secs(15),
            &format!("a message on {queue}"),
            || async {
                // Get only once a message is ready: a get from a missing queue
                // closes the channel, and RabbitMQ 3.10 answers a get on a
                // quorum queue whose Raft member is still starting (another
                // client just declared it) with a connection error (`noproc`).
                for q in self.with_bands(queue) {
                    let Some(p) = guildhall_broker::topology::probe_queue(&self.conn, &q)
                        .await
                        .ok()
                        .flatten()
                    else {
                        continue;
                    };
                    if p.ready == 0 {
                        continue;
                    }
                    if let Some(m) = self
                        .channel
                        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                        .await?
                    {
                        return Ok(m);
                    }
                }
                anyhow::bail!("nothing ready")
            },
        )
        .await
    }

    /// Takes every message now in `queue`: `(message id, payload, headers)`.
    pub async fn drain(&self, queue: &str) -> anyhow::Result<Vec<(String, String, FieldTable)>> {
        let mut out = Vec::new();
        for q in self.with_bands(queue) {
            if q != queue
                && guildhall_broker::topology::probe_queue(&self.conn, &q)
                    .await?
                    .is_none()
            {
                continue;
            }
            self.drain_one(&q, &mut out).await?;
        }
        Ok(out)
    }

    async fn drain_one(
        &self,
        queue: &str,
        out: &mut Vec<(String, String, FieldTable)>,
    ) -> anyhow::Result<()> {
        let ch = self.conn.create_channel().await?;
        while let Some(msg) = ch
            .basic_get(queue.into(), BasicGetOptions::default())
            .await?
        {
            let id = msg
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            let headers = msg
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            out.push((
                id,
                String::from_utf8_lossy(&msg.delivery.data).into_owned(),
                headers,
            ));
            msg.delivery.ack(BasicAckOptions::default()).await?;
        }
        let _ = ch.close(200, "drained".into()).await;
        Ok(())
    }

    /// A reader of the events stream from its start.
    pub async fn events(&self) -> anyhow::Result<EventReader> {
        EventReader::open(&self.conn, &self.names).await
    }

    /// Reads every envelope now on the events stream: until nothing new
    /// came for 500 ms, or for at most 30 s while agents still publish.
    pub async fn read_events(&self) -> anyhow::Result<Vec<guildhall_proto::Envelope>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut reader = self.events().await?;
        let mut out = Vec::new();
        while let Some(decoded) = reader.next_envelope(Duration::from_millis(500)).await? {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            if let Ok(envelope) = decoded {
                out.push(envelope);
            }
        }
        reader.close().await;
        Ok(out)
    }

    /// Sends a command to one agent and waits up to 10 s for its reply,
    /// which must answer it (correlation id, command id, agent).
    pub async fn command(&self, agent: &AgentId, command: Command) -> CommandReply {
        let ch = self.conn.create_channel().await.expect("a channel");
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let reply_queue = ch
            .queue_declare("".into(), options, FieldTable::default())
            .await
            .expect("a reply queue");
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let mut replies = ch
            .basic_consume(
                reply_queue.name().clone(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await
            .expect("consume the reply queue");
        let id = rand::random::<u64>();
        let message = CommandMessage {
            id,
            sent_at_ms: now_ms(),
            command,
        };
        let correlation = format!("c-{id}");
        let props = BasicProperties::default()
            .with_reply_to(reply_queue.name().clone())
            .with_correlation_id(correlation.as_str().into());
        self.publisher
            .publish(
                &self.names.control_exchange(),
                &Names::control_key_agent(agent),
                &encode_command(&message).expect("encode a command"),
                props,
            )
            .await
            .expect("publish a command");
        let delivery = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("a reply within 10 s")
            .expect("the reply consumer is open")
            .expect("a reply");
        let got = delivery.properties.correlation_id().as_ref();
        assert_eq!(got.map(|c| c.as_str()), Some(correlation.as_str()));
        let _ = ch.close(200, "done".into()).await;
        let reply: CommandReply = decode_reply(&delivery.data).expect("a command reply");
        assert_eq!(reply.id, id);
        assert_eq!(&reply.agent, agent);
        reply
    }

    /// Waits until the management API lists the agent's connection (it
    /// shows a new connection only after its next stats refresh, ~5 s).
    pub async fn wait_for_connection(&self, agent: &AgentId) {
        let management = management();
        let name = self.names.agent_connection_name(agent);
        eventually(
            Duration::from_secs(20),
            "the agent's connection to be listed",
            || async {
                let listed = management.connections().await?;
                let found = listed
                    .iter()
                    .any(|c| c.user_provided_name.as_deref() == Some(name.as_str()));
                anyhow::ensure!(found, "{name} is not listed");
                Ok(())
            },
        )
        .await;
    }

    /// Has the broker close the agent's connection, as the coordinator does
    /// to a frozen agent.
    pub async fn close_connection(&self, agent: &AgentId) {
        let management = management();
        let name = self.names.agent_connection_name(agent);
        eventually(
            Duration::from_secs(20),
            "the agent's connection to be closed",
            || async {
                let closed = management
                    .close_connections_named(&name, "closed by a test")
                    .await?;
                anyhow::ensure!(closed > 0, "{name} is not listed yet");
                Ok(())
            },
        )
        .await;
    }

    /// Declares `queue` as an exclusive queue of the test's connection, as
    /// an agent declares its command queue, retrying for up to a second
    /// while someone else holds it. `None` if it stayed taken.
    pub async fn hold_exclusive_queue(&self, queue: &str) -> Option<Channel> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline {
            let ch = self.conn.create_channel().await.expect("a channel");
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("classic")),
            );
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            if ch.queue_declare(queue.into(), options, args).await.is_ok() {
                return Some(ch);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}
