//! The stage's band consumers: one consumer per band queue on the stage
//! consumer channel, each with the agent's prefetch (so the high band
//! always has credit with the broker, however many lower tasks the agent
//! holds), and the deliveries they brought held here until the driver can
//! start one; then [`crate::core::bands::BandPicker`] chooses the band.
//!
//! Every time the driver takes a delivery, whatever the three consumers
//! have already received is collected first, so the choice is made among
//! all deliveries in the agent, not only the first to arrive.

use crate::core::bands::BandPicker;
use futures_lite::StreamExt;
use futures_lite::future::poll_once;
use guildhall_proto::{Band, Names, Stage};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use std::collections::VecDeque;
use std::time::Duration;

/// The band consumers of one stage and what they brought.
pub(crate) struct Bands {
    /// One consumer per band, indexed by [`Band::index`].
    consumers: Vec<Consumer>,
    /// Deliveries received and not yet taken, per band.
    held: [VecDeque<Delivery>; 3],
    /// Chooses the band of the next start.
    picker: BandPicker,
    /// A consumer failed: the error, for the driver.
    failed: Option<lapin::Error>,
    /// A consumer ended (the broker cancelled it).
    ended: bool,
}

impl Bands {
    /// Consumes `stage`'s three band queues on `channel` (whose `basic.qos`
    /// is already set), owing lower bands `share` of the starts.
    pub(crate) async fn start(
        channel: &Channel,
        names: &Names,
        stage: &Stage,
        share: f64,
    ) -> Result<Self, lapin::Error> {
        let mut consumers = Vec::with_capacity(3);
        for band in Band::ALL {
            let queue = names.band_queue(stage, band);
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push(consumer);
        }
        Ok(Self {
            consumers,
            held: Default::default(),
            picker: BandPicker::new(share),
            failed: None,
            ended: false,
        })
    }

    /// Takes in whatever the consumers already received.
    async fn collect(&mut self) {
        for (i, consumer) in self.consumers.iter_mut().enumerate() {
            loop {
                match poll_once(consumer.next()).await {
                    Some(Some(Ok(delivery))) => self.held[i].push_back(delivery),
                    Some(Some(Err(err))) => {
                        self.failed.get_or_insert(err);
                        break;
                    }
                    Some(None) => {
                        self.ended = true;
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    /// The next delivery to start, highest band first but for the share;
    /// `None` once a consumer ended. Cancel-safe: what was received is
    /// kept here.
    pub(crate) async fn next(&mut self) -> Option<lapin::Result<Delivery>> {
        loop {
            self.collect().await;
            if let Some(err) = self.failed.take() {
                return Some(Err(err));
            }
            if self.ended {
                return None;
            }
            let waiting = [0, 1, 2].map(|i| !self.held[i].is_empty());
            if let Some(band) = self.picker.pick(waiting)
                && let Some(delivery) = self.held[band.index()].pop_front()
            {
                return Some(Ok(delivery));
            }
            // Nothing here: wait for any consumer.
            let (a, rest) = self.consumers.split_at_mut(1);
            let (b, c) = rest.split_at_mut(1);
            let any = futures_lite::future::or(
                async { (0, a[0].next().await) },
                futures_lite::future::or(async { (1, b[0].next().await) }, async {
                    (2, c[0].next().await)
                }),
            );
            match any.await {
                (i, Some(Ok(delivery))) => self.held[i].push_back(delivery),
                (_, Some(Err(err))) => return Some(Err(err)),
                (_, None) => return None,
            }
        }
    }

    /// Cancels the consumers and gives back every delivery not taken.
    pub(crate) async fn cancel(mut self, channel: &Channel) -> Result<(), lapin::Error> {
        for consumer in &self.consumers {
            channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await?;
        }
        for held in &mut self.held {
            for delivery in held.drain(..) {
                let _ = delivery.acker.nack(REQUEUE).await;
            }
        }
        let drain = async {
            for consumer in &mut self.consumers {
                give_back(consumer).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        Ok(())
    }
}

/// A nack that puts the delivery back in its queue.
const REQUEUE: BasicNackOptions = BasicNackOptions {
    multiple: false,
    requeue: true,
};

/// Gives back (nack, requeue) what a cancelled `consumer` had buffered:
/// after cancel-ok its stream yields what it buffered, then ends. Callers
/// bound the wait.
pub(crate) async fn give_back(consumer: &mut Consumer) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let _ = delivery.acker.nack(REQUEUE).await;
    }
}
