//! A broker connection that is opened on first use and reopened after it
//! fails, with a confirm-mode publisher on it. Used for submissions, the
//! start-up marker and queue probes; the stream consumer has its own.

use guildhall_broker::{AmqpUrls, BrokerError, Publisher, connect_any};
use lapin::Connection;
use std::sync::Arc;
use tokio::sync::Mutex;

/// A lazily (re)connected link to the broker.
pub struct BrokerLink {
    /// Where the broker is (its addresses).
    url: AmqpUrls,
    /// The AMQP connection name.
    name: String,
    /// The live connection and its publisher, if any, and the index of
    /// the address connected to (tried last once the connection is lost).
    live: Mutex<Option<(Arc<Connection>, Publisher, usize)>>,
}

impl BrokerLink {
    /// A link that will connect to `url` as `name` when first used.
    pub fn new(url: AmqpUrls, name: String) -> Self {
        Self {
            url,
            name,
            live: Mutex::new(None),
        }
    }

    /// The connection and publisher, connecting (again) if needed.
    pub async fn get(&self) -> Result<(Arc<Connection>, Publisher), BrokerError> {
        let mut live = self.live.lock().await;
        if let Some((conn, publisher, _)) = live.as_ref()
            && conn.status().connected()
            && publisher.channel().status().connected()
        {
            return Ok((conn.clone(), publisher.clone()));
        }
        let last = live.as_ref().map(|(_, _, address)| *address);
        let (conn, address) = connect_any(&self.url, &self.name, last).await?;
        let conn = Arc::new(conn);
        let publisher = Publisher::open(&conn).await?;
        *live = Some((conn.clone(), publisher.clone(), address));
        Ok((conn, publisher))
    }

    /// Closes the connection, if open.
    pub async fn close(&self) {
        if let Some((conn, _, _)) = self.live.lock().await.take() {
            let _ = conn.close(200, "shutting down".into()).await;
        }
    }
}
