//! Sending commands to agents and waiting for their replies.
//!
//! Commands go to the topic exchange `<ns>.control` with the routing key
//! `agent.<id>`, `mandatory`, confirmed: if no queue is bound for that key the
//! agent is not connected, and the broker returns the command at once.
//! Replies come back through RabbitMQ's direct reply-to
//! (`amq.rabbitmq.reply-to`), matched to the request by its id. The
//! controller has a connection of its own, opened on first use and again after
//! it fails.

use futures_lite::StreamExt;
use guildhall_broker::topology::declare_control;
use guildhall_broker::{AmqpUrls, BrokerError, connect_any, now_ms};
use guildhall_proto::command::{self, CommandMessage};
use guildhall_proto::{AgentId, Command, CommandReply, Names};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// RabbitMQ's pseudo-queue for direct replies.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Why a command got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No agent with that id is connected (no queue bound for its key).
    #[error("agent {0} is not connected")]
    NotConnected(AgentId),
    /// The agent did not answer in time.
    #[error("agent {agent} did not confirm {command} within {timeout:?}")]
    Timeout {
        /// The agent.
        agent: AgentId,
        /// The command's kind.
        command: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
    /// The broker could not be reached, or refused the command.
    #[error("cannot send the command: {0}")]
    Broker(String),
}

impl From<BrokerError> for ControlError {
    fn from(e: BrokerError) -> Self {
        ControlError::Broker(e.to_string())
    }
}

impl From<lapin::Error> for ControlError {
    fn from(e: lapin::Error) -> Self {
        ControlError::Broker(e.to_string())
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<CommandReply>>>>;

/// A live connection with its channel (replies consumed, publishes confirmed).
struct Live {
    /// The connection, kept open while the channel is used.
    conn: Connection,
    /// Publishes commands and consumes replies (direct reply-to needs both
    /// on one channel).
    channel: Channel,
    /// Index of the broker address connected to: tried last once this
    /// connection is lost.
    address: usize,
}

/// Sends commands to agents.
pub struct Controller {
    /// Where the broker is.
    url: AmqpUrls,
    /// Broker names of the namespace.
    names: Names,
    /// The connection's name.
    conn_name: String,
    /// The connection, once opened.
    live: tokio::sync::Mutex<Option<Live>>,
    /// Replies awaited, by command id.
    pending: Pending,
}

impl Controller {
    /// A controller for `names` on the broker at `url`; connects on first use.
    pub fn new(url: AmqpUrls, names: Names, conn_name: String) -> Self {
        Self {
            url,
            names,
            conn_name,
            live: tokio::sync::Mutex::new(None),
            pending: Arc::default(),
        }
    }

    async fn channel(&self) -> Result<Channel, ControlError> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref()
            && l.conn.status().connected()
            && l.channel.status().connected()
        {
            return Ok(l.channel.clone());
        }
        let last = live.as_ref().map(|l| l.address);
        let (conn, address) = connect_any(&self.url, &self.conn_name, last).await?;
        declare_control(&conn, &self.names).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut replies = channel
            .basic_consume(
                REPLY_TO.into(),
                "guildhall-controller".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let pending = self.pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                match command::decode::<CommandReply>(&delivery.data) {
                    Ok(reply) => {
                        let waiter = pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&reply.id);
                        if let Some(w) = waiter {
                            let _ = w.send(reply);
                        }
                    }
                    Err(e) => tracing::warn!("unreadable command reply dropped: {e}"),
                }
            }
        });
        *live = Some(Live {
            conn,
            channel: channel.clone(),
            address,
        });
        Ok(channel)
    }

    /// Sends `command` to `agent` and waits for its reply: all of it within
    /// `timeout`.
    pub async fn send(
        &self,
        agent: &AgentId,
        command: Command,
        timeout: Duration,
    ) -> Result<CommandReply, ControlError> {
        let kind = command.kind();
        let id: u64 = rand::random();
        let message = CommandMessage {
            id,
            sent_at_ms: now_ms(),
            command,
        };
        let bytes = command::encode(&message).map_err(|e| ControlError::Broker(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        // One deadline for all of it: connecting, the broker's confirm and
        // the agent's reply (a stuck broker must not hold a request).
        let deadline = tokio::time::Instant::now() + timeout;
        let result = tokio::time::timeout_at(deadline, self.publish(agent, id, &bytes, timeout))
            .await
            .unwrap_or(Err(ControlError::Timeout {
                agent: agent.clone(),
                command: kind,
                timeout,
            }));
        let outcome = match result {
            Ok(()) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(reply)) => Ok(reply),
                _ => Err(ControlError::Timeout {
                    agent: agent.clone(),
                    command: kind,
                    timeout,
                }),
            },
            Err(e) => Err(e),
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        outcome
    }

    async fn publish(
        &self,
        agent: &AgentId,
        id: u64,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<(), ControlError> {
        let channel = self.channel().await?;
        // A command that waited longer than the caller would is not carried
        // out late: it expires in the agent's queue.
        let mut props = BasicProperties::default()
            .with_reply_to(REPLY_TO.into())
            .with_correlation_id(id.to_string().into())
            .with_expiration(timeout.as_millis().to_string().into());
        // The broker refuses a `user_id` other than the publisher's own
        // user, so agents started with `--command-user` can tell this
        // coordinator's commands from anything else that reaches their queue
        // (anyone who may publish to the default exchange can put a message
        // there).
        if !self.url.username().is_empty() {
            props = props.with_user_id(self.url.username().into());
        }
        let confirm = channel
            .basic_publish(
                self.names.control_exchange().as_str().into(),
                Names::control_key_agent(agent).as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                bytes,
                props,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(ControlError::NotConnected(agent.clone())),
            Confirmation::Nack(_) => Err(ControlError::Broker(
                "the broker refused the command".into(),
            )),
        }
    }

    /// Publishes `command` on the control exchange with routing `key`
    /// (`all`, `agent.<id>`), confirmed by the broker, expecting no reply:
    /// for commands that every agent keeps, like `Cancel` (issue 18). No
    /// agent connected is not an error.
    pub async fn broadcast(&self, key: &str, command: Command) -> Result<(), ControlError> {
        let message = CommandMessage {
            id: rand::random(),
            sent_at_ms: now_ms(),
            command,
        };
        let bytes = command::encode(&message).map_err(|e| ControlError::Broker(e.to_string()))?;
        let channel = self.channel().await?;
        let mut props = BasicProperties::default();
        if !self.url.username().is_empty() {
            props = props.with_user_id(self.url.username().into());
        }
        let confirm = channel
            .basic_publish(
                self.names.control_exchange().as_str().into(),
                key.into(),
                BasicPublishOptions::default(),
                &bytes,
                props,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Nack(_) => Err(ControlError::Broker(
                "the broker refused the command".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Closes the connection, if open.
    pub async fn close(&self) {
        if let Some(l) = self.live.lock().await.take() {
            let _ = l.conn.close(200, "shutting down".into()).await;
        }
    }
}
