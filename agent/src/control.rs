//! Commands from the control exchange, and the replies.
//!
//! Each agent has an exclusive, auto-deleted queue `<ns>.agent.<id>` bound
//! on `<ns>.control` to `agent.<id>`, `stage.<stage>` and `all`, declared
//! again with each connection (it goes with the previous one; commands sent
//! while the agent is disconnected are not received). A command
//! (postcard, [`CommandMessage`]) that does not decode is logged and dropped.
//! When the message has a `reply_to`, a [`CommandReply`] goes there through
//! the default exchange with the same `correlation_id`.
//!
//! | command | effect |
//! |---|---|
//! | `Pause` | stop consuming; tasks in hand finish |
//! | `Resume` | consume again |
//! | `Drain` | stop consuming, finish tasks in hand, stop the agent |
//! | `SetConcurrency` | new concurrency and prefetch (consumer re-created; tasks in hand kept) |
//! | `RestartWorker` | restart the supervised worker (its tasks go back to the queue) |
//! | `Logs` | the last lines of the supervised worker's output |
//! | `Assign`, `SetPrefetch` | refused: not supported yet |

use crate::config;
use crate::config::MAX_CONCURRENCY;
use crate::runner::{Lost, Mode, Runner};
use futures_lite::StreamExt;
use guildhall_broker::BrokerError;
use guildhall_proto::command::{decode, encode};
use guildhall_proto::names::CONTROL_KEY_ALL;
use guildhall_proto::{AgentId, Command, CommandMessage, CommandReply, Names, Stage};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};

/// The agent's command queue and its consumer.
#[derive(Debug)]
pub struct ControlQueue {
    /// The channel it is consumed on.
    channel: Channel,
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
        Ok(Self { channel, consumer })
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

/// The verdict on one command.
struct Verdict {
    /// Whether it was carried out.
    ok: bool,
    /// What happened.
    message: String,
    /// Log lines for `Logs`.
    lines: Vec<String>,
}

impl Verdict {
    fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: message.into(),
            lines: Vec::new(),
        }
    }

    fn refused(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            lines: Vec::new(),
        }
    }
}

impl Runner {
    /// Applies one command message and replies if asked to. Only a lost
    /// link is an error (and then there is no reply).
    pub(crate) async fn on_command(&mut self, delivery: Delivery) -> Result<(), Lost> {
        let message = match decode::<CommandMessage>(&delivery.data) {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(
                    bytes = delivery.data.len(),
                    "dropping an unreadable command: {err}"
                );
                return Ok(());
            }
        };
        tracing::info!(
            command = message.command.kind(),
            id = message.id,
            "command received"
        );
        let verdict = self.apply(&message.command).await?;
        if verdict.ok {
            tracing::info!(command = message.command.kind(), "{}", verdict.message);
        } else {
            tracing::warn!(
                command = message.command.kind(),
                "refused: {}",
                verdict.message
            );
        }
        if let Some(reply_to) = delivery.properties.reply_to() {
            let reply = CommandReply {
                id: message.id,
                agent: self.config.id.clone(),
                ok: verdict.ok,
                message: verdict.message,
                lines: verdict.lines,
            };
            self.reply(
                reply_to.clone(),
                delivery.properties.correlation_id().clone(),
                &reply,
            );
        }
        Ok(())
    }

    async fn apply(&mut self, command: &Command) -> Result<Verdict, Lost> {
        let stopping = matches!(self.mode, Mode::Stopping { .. });
        let in_hand = self.tasks_in_hand();
        Ok(match command {
            Command::Pause if stopping => Verdict::refused("the agent is stopping"),
            Command::Pause if self.mode == Mode::Paused => Verdict::ok("already paused"),
            Command::Pause => {
                self.mode = Mode::Paused;
                self.reconcile().await?;
                Verdict::ok(format!("paused; {in_hand} task(s) in hand will finish"))
            }
            Command::Resume if stopping => Verdict::refused("the agent is stopping"),
            Command::Resume if self.mode == Mode::Running => Verdict::ok("already running"),
            Command::Resume => {
                self.mode = Mode::Running;
                self.reconcile().await?;
                Verdict::ok("resumed")
            }
            Command::Drain => {
                self.begin_stop("drain".into());
                self.reconcile().await?;
                Verdict::ok(format!(
                    "draining: stopping after {in_hand} task(s) in hand"
                ))
            }
            Command::SetConcurrency { concurrency } => {
                if !(1..=MAX_CONCURRENCY).contains(concurrency) {
                    Verdict::refused(format!(
                        "concurrency must be between 1 and {MAX_CONCURRENCY} (got {concurrency})"
                    ))
                } else {
                    let old = self.ctx.shared.concurrency();
                    self.ctx.shared.set_concurrency(*concurrency);
                    self.restart_consumer().await?;
                    self.heartbeats.now();
                    Verdict::ok(format!("concurrency {old} -> {concurrency}"))
                }
            }
            Command::RestartWorker => match &self.supervisor {
                Some(supervisor) if supervisor.restart() => {
                    Verdict::ok("restarting the worker process")
                }
                Some(_) => Verdict::refused("the supervisor has stopped"),
                None => Verdict::refused("this agent does not supervise a worker process"),
            },
            Command::Logs { lines } => match &self.supervisor {
                Some(supervisor) => {
                    let n = (*lines as usize).min(self.config.log_lines);
                    let lines = supervisor.logs(n);
                    Verdict {
                        ok: true,
                        message: format!("{} line(s)", lines.len()),
                        lines,
                    }
                }
                None => Verdict::refused("this agent does not supervise a worker process"),
            },
            Command::Assign { .. } | Command::SetPrefetch { .. } => {
                Verdict::refused("not supported yet")
            }
        })
    }

    /// Publishes a reply in the background (a gone reply queue is only logged).
    fn reply(
        &mut self,
        reply_to: ShortString,
        correlation: Option<ShortString>,
        reply: &CommandReply,
    ) {
        let bytes = match encode(reply) {
            Ok(bytes) => bytes,
            Err(err) => {
                tracing::warn!("cannot encode a command reply: {err}");
                return;
            }
        };
        let mut props = BasicProperties::default();
        if let Some(correlation) = correlation {
            props = props.with_correlation_id(correlation);
        }
        let Some(publisher) = self.publisher() else {
            tracing::info!("command reply not sent: the broker is unreachable");
            return;
        };
        self.replies.spawn(async move {
            if let Err(err) = publisher
                .publish("", reply_to.as_str(), &bytes, props)
                .await
            {
                tracing::info!(
                    "command reply not delivered: {}",
                    config::one_line(&err.to_string())
                );
            }
        });
        // Reap finished replies so the set does not grow.
        while self.replies.try_join_next().is_some() {}
    }
}
