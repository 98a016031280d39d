//! Publishing with confirms: a message counts as sent only once the broker
//! confirmed it and did not return it as unroutable.

use crate::BrokerError;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

/// Why a publish did not take.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("publish to {target} failed: {source}")]
    Amqp {
        /// `exchange/routing key`.
        target: String,
        /// The client's error.
        source: lapin::Error,
    },
    /// The broker refused to take responsibility (disk alarm, queue limit).
    #[error("broker refused (nack) the message to {target}")]
    Nacked {
        /// `exchange/routing key`.
        target: String,
    },
    /// The publish was not attempted: what it needs first (a connection, a
    /// check of its target, a declaration) failed.
    #[error("cannot publish to {target}: {reason}")]
    NotAttempted {
        /// Where it would have gone.
        target: String,
        /// What failed.
        reason: String,
    },
    /// No queue is bound for the routing key: the message would be lost.
    #[error("no queue for {target}: message returned unroutable")]
    Unroutable {
        /// `exchange/routing key`.
        target: String,
    },
}

/// A confirm-mode channel used only for publishing.
#[derive(Debug, Clone)]
pub struct Publisher {
    /// The channel, in confirm mode.
    channel: Channel,
}

/// A publish the broker has not confirmed yet; [`Pending::wait`] for it.
#[derive(Debug)]
pub struct Pending {
    /// The broker's future confirm.
    confirm: PublisherConfirm,
    /// `exchange/routing key`, for errors.
    target: String,
}

impl Pending {
    /// Waits for the broker's verdict.
    pub async fn wait(self) -> Result<(), PublishError> {
        let target = self.target;
        match self.confirm.await {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Ack(Some(_))) => Err(PublishError::Unroutable { target }),
            Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked { target }),
            Err(source) => Err(PublishError::Amqp { target, source }),
        }
    }
}

impl Publisher {
    /// Opens a channel on `conn` and puts it in confirm mode.
    pub async fn open(conn: &Connection) -> Result<Self, BrokerError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::amqp("open publish channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::amqp("enable publisher confirms"))?;
        Ok(Self { channel })
    }

    /// The channel, for declarations that should share it.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Sends a mandatory message without waiting for its confirm, so several
    /// can be in flight; call [`Pending::wait`] on each.
    pub async fn start(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<Pending, PublishError> {
        self.send(exchange, routing_key, payload, properties, true)
            .await
    }

    /// Answers a request through RabbitMQ's direct reply-to
    /// (`amq.rabbitmq.reply-to.*`) and waits for the confirm. Not mandatory:
    /// the broker treats a reply-to name as "not a queue" and would return
    /// every mandatory reply as unroutable even when it was delivered. A
    /// requester that is gone loses its reply, which it no longer waits for.
    pub async fn reply(
        &self,
        reply_to: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.send("", reply_to, payload, properties, false)
            .await?
            .wait()
            .await
    }

    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<Pending, PublishError> {
        let target = format!("{exchange}/{routing_key}");
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                payload,
                properties,
            )
            .await
            .map_err(|source| PublishError::Amqp {
                target: target.clone(),
                source,
            })?;
        Ok(Pending { confirm, target })
    }

    /// Sends a mandatory message and waits until the broker confirmed it.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.start(exchange, routing_key, payload, properties)
            .await?
            .wait()
            .await
    }
}
