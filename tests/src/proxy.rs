//! A TCP proxy in the test process, to take a broker away from a client
//! without touching the broker: [`TcpProxy::cut`] drops every connection
//! through it and refuses new ones (the port is closed), as a dead broker
//! node would look to the client.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A proxy from a port of its own on 127.0.0.1 to `target`.
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The accept loop and every connection's copy task, aborted by `cut`.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let held = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let copy = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().unwrap_or_else(|e| e.into_inner()).push(copy);
            }
        });
        tasks.lock().unwrap_or_else(|e| e.into_inner()).push(accept);
        Ok(Self { addr, tasks })
    }

    /// An AMQP URL (guest) through the proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Drops every connection and closes the port.
    pub fn cut(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
