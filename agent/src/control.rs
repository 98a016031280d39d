//! Commands from the control exchange, and the replies.
//!
//! Each agent has an exclusive, auto-deleted queue `<ns>.agent.<id>` bound
//! on `<ns>.control` to `agent.<id>`, `stage.<stage>` (the stage it serves
//! now: the binding moves with `Assign`) and `all`, declared again with each
//! connection (it goes with the previous one; commands sent
//! while the agent is disconnected are not received). A command
//! (postcard, [`CommandMessage`]) that does not decode is logged and dropped,
//! and so is one whose broker-checked `user_id` is not `--command-user`
//! (when given).
//! When the message has a `reply_to`, a [`CommandReply`] goes there through
//! the default exchange with the same `correlation_id`.
//!
//! | command | effect |
//! |---|---|
//! | `Pause` | stop consuming; tasks in hand finish |
//! | `Resume` | consume again |
//! | `Drain` | stop consuming, finish tasks in hand, stop the agent |
//! | `SetConcurrency` | new concurrency, 1 to 1024; the prefetch follows if it was below (consumer re-created; tasks in hand kept) |
//! | `SetPrefetch` | new prefetch, 1 to 10,000, in effect never below the concurrency (consumer re-created; tasks in hand kept) |
//! | `Assign` | serve another of the `--stages` (see [`crate::core::AgentCore::assign`]); refused for a stage not listed, or while stopping; a no-op for the stage served |
//! | `RestartWorker` | restart the supervised worker (its tasks go back to the queue) |
//! | `Logs` | the last lines of the supervised worker's output |
//!
//! Changes of the consumer (pause, prefetch, stage) apply on the next consume
//! when the agent is paused or waiting for its worker: a paused agent that is
//! assigned a stage switches and stays paused.

//!
//! What each command does is the core's ([`crate::core::commands`]); this
//! module is the queue, reading a command and sending the reply.

use crate::config;
use crate::core::Verdict;
use crate::link::Lost;
use futures_lite::StreamExt;
use guildhall_broker::{BrokerError, Publisher};
use guildhall_proto::command::{decode, encode};
use guildhall_proto::names::CONTROL_KEY_ALL;
use guildhall_proto::{AgentId, CommandMessage, CommandReply, Names, Stage};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio::task::JoinSet;

/// The agent's command queue and its consumer.
#[derive(Debug)]
pub struct ControlQueue {
    /// The channel it is consumed on.
    channel: Channel,
    /// The queue's name, to move its stage binding.
    queue: String,
    /// Commands, auto-acked.
    consumer: Consumer,
}

impl ControlQueue {
    /// Declares `<ns>.agent.<id>`, binds it and starts consuming it.
    pub async fn open(
        conn: &Connection,
        names: &Names,
        id: &AgentId,
        stage: &Stage,
    ) -> Result<Self, BrokerError> {
        let amqp = |what: String| move |source| BrokerError::Amqp { what, source };
        let channel = conn
            .create_channel()
            .await
            .map_err(amqp("open the control channel".into()))?;
        let queue = names.agent_control_queue(id);
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("classic")),
        );
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(amqp(format!(
                "declare the command queue {queue} (is another agent running with id {id}?)"
            )))?;
        let exchange = names.control_exchange();
        for key in [
            Names::control_key_agent(id),
            Names::control_key_stage(stage),
            CONTROL_KEY_ALL.to_owned(),
        ] {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp(format!("bind {queue} to {exchange} with {key}")))?;
        }
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("consume {queue}")))?;
        Ok(Self {
            channel,
            queue,
            consumer,
        })
    }

    /// What moving its stage binding needs, apart from the queue itself
    /// (which the runner's borrow of the link holds).
    pub fn binding(&self) -> StageBinding {
        StageBinding {
            channel: self.channel.clone(),
            queue: self.queue.clone(),
        }
    }

    /// The next command message; an error when the consumer is gone.
    pub async fn next(&mut self) -> Result<Delivery, Lost> {
        match self.consumer.next().await {
            Some(Ok(delivery)) => Ok(delivery),
            Some(Err(err)) => Err(Lost::new("command consumer", err)),
            None => Err(Lost::new(
                "command consumer",
                "the broker cancelled it (was the command queue deleted?)",
            )),
        }
    }

    /// The channel it is consumed on, watched for health.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Closes the channel (the exclusive queue goes with the connection).
    pub async fn close(&self) {
        let _ = self.channel.close(200, "agent stopping".into()).await;
    }
}

/// The command queue's channel and name, to move its stage binding.
#[derive(Debug, Clone)]
pub struct StageBinding {
    /// The command queue's channel.
    channel: Channel,
    /// The command queue.
    queue: String,
}

impl StageBinding {
    /// Moves the stage binding from `from` to `to`: commands to the stage
    /// served reach the agent, those to the stage it left no longer do.
    pub async fn rebind(&self, names: &Names, from: &Stage, to: &Stage) -> Result<(), Lost> {
        let exchange = names.control_exchange();
        let (from, to) = (Names::control_key_stage(from), Names::control_key_stage(to));
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                exchange.as_str().into(),
                to.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| Lost::new(&format!("bind the command queue to {to}"), e))?;
        self.channel
            .queue_unbind(
                self.queue.as_str().into(),
                exchange.as_str().into(),
                from.as_str().into(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| Lost::new(&format!("unbind the command queue from {from}"), e))
    }
}

/// The command in `delivery`, if it is to be obeyed: one whose sender is
/// not `command_user` (when given) or that does not decode is logged and
/// dropped.
pub fn read(delivery: &Delivery, command_user: Option<&str>) -> Option<CommandMessage> {
    if let Some(want) = command_user {
        let sender = delivery.properties.user_id().as_ref().map(|u| u.as_str());
        if sender != Some(want) {
            tracing::warn!(
                sender = sender.unwrap_or("(none)"),
                expected = %want,
                "dropping a command not sent by the coordinator's user"
            );
            return None;
        }
    }
    match decode::<CommandMessage>(&delivery.data) {
        Ok(message) => {
            tracing::info!(
                command = message.command.kind(),
                id = message.id,
                "command received"
            );
            Some(message)
        }
        Err(err) => {
            tracing::warn!(
                bytes = delivery.data.len(),
                "dropping an unreadable command: {err}"
            );
            None
        }
    }
}

/// Logs the verdict on `command` and, if its message asked for one,
/// publishes the reply in the background on `replies` (a gone reply queue
/// is only logged; without a link it is not sent).
pub fn answer(
    delivery: &Delivery,
    message: &CommandMessage,
    agent: &AgentId,
    verdict: Verdict,
    publisher: Option<Publisher>,
    replies: &mut JoinSet<()>,
) {
    if verdict.ok {
        tracing::info!(command = message.command.kind(), "{}", verdict.message);
    } else {
        tracing::warn!(
            command = message.command.kind(),
            "refused: {}",
            verdict.message
        );
    }
    let Some(reply_to) = delivery.properties.reply_to().clone() else {
        return;
    };
    let reply = CommandReply {
        id: message.id,
        agent: agent.clone(),
        ok: verdict.ok,
        message: verdict.message,
        lines: verdict.lines,
    };
    let bytes = match encode(&reply) {
        Ok(bytes) => bytes,
        Err(err) => {
            tracing::warn!("cannot encode a command reply: {err}");
            return;
        }
    };
    let mut props = BasicProperties::default();
    if let Some(correlation) = delivery.properties.correlation_id().clone() {
        props = props.with_correlation_id(correlation);
    }
    let Some(publisher) = publisher else {
        tracing::info!("command reply not sent: the broker is unreachable");
        return;
    };
    replies.spawn(async move {
        if let Err(err) = publisher.reply(reply_to.as_str(), &bytes, props).await {
            tracing::info!(
                "command reply not delivered: {}",
                config::one_line(&err.to_string())
            );
        }
    });
    // Reap finished replies so the set does not grow.
    while replies.try_join_next().is_some() {}
}
