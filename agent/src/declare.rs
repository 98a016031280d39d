//! Declarations made lazily while tasks flow: next stages a worker names and
//! retry queues for each delay. Each is declared once per connection and
//! remembered (a new connection gets a new, empty [`Declarer`]: the broker
//! may have lost its queues, a restart of it being one reason to reconnect). Declarations run on a short-lived channel of their own, so a
//! refused one (arguments that differ from an existing queue's) closes only
//! that channel.

use guildhall_broker::BrokerError;
use guildhall_broker::topology::{declare_retry_queue, declare_stage};
use guildhall_proto::{Names, Stage};
use lapin::{Channel, Connection};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Declares stages and retry queues at most once each.
#[derive(Debug)]
pub struct Declarer {
    /// The agent's connection, for short-lived channels.
    conn: Arc<Connection>,
    /// Names of the namespace.
    names: Names,
    /// Queue names known to be declared.
    done: Mutex<HashSet<String>>,
}

impl Declarer {
    /// A declarer that already knows `declared` (the stages declared at start).
    pub fn new(conn: Arc<Connection>, names: Names, declared: &[&Stage]) -> Self {
        let done = declared.iter().map(|s| names.stage_queue(s)).collect();
        Self {
            conn,
            names,
            done: Mutex::new(done),
        }
    }

    fn known(&self, queue: &str) -> bool {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(queue)
    }

    fn remember(&self, queue: String) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue);
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        self.conn
            .create_channel()
            .await
            .map_err(|source| BrokerError::Amqp {
                what: "open a channel for declarations".into(),
                source,
            })
    }

    /// Forgets that `stage` was declared (its queue turned out to be gone),
    /// so the next use declares it again.
    pub fn forget_stage(&self, stage: &Stage) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.names.stage_queue(stage));
    }

    /// Makes sure `stage`'s queue (and dead-letter queue) exist.
    pub async fn stage(&self, stage: &Stage) -> Result<(), BrokerError> {
        let queue = self.names.stage_queue(stage);
        if self.known(&queue) {
            return Ok(());
        }
        let ch = self.channel().await?;
        let result = declare_stage(&ch, &self.names, stage).await;
        let _ = ch.close(200, "declared".into()).await;
        result?;
        self.remember(queue);
        Ok(())
    }

    /// Makes sure the retry queue of `stage` for `delay_ms` exists; returns its name.
    pub async fn retry_queue(&self, stage: &Stage, delay_ms: u64) -> Result<String, BrokerError> {
        let queue = self.names.retry_queue(stage, delay_ms);
        if self.known(&queue) {
            return Ok(queue);
        }
        let ch = self.channel().await?;
        let result = declare_retry_queue(&ch, &self.names, stage, delay_ms).await;
        let _ = ch.close(200, "declared".into()).await;
        let queue = result?;
        self.remember(queue.clone());
        Ok(queue)
    }
}
