//! A TCP proxy in the test process, to take a broker away from a client
//! without touching the broker: [`TcpProxy::cut`] drops every connection
//! through it and refuses new ones (the port is closed), as a dead broker
//! node would look to the client; [`TcpProxy::freeze_where`] stops
//! forwarding on some open connections while keeping their sockets open,
//! as a stuck peer would look.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Bytes of what a client sent first that a connection keeps, for
/// [`TcpProxy::freeze_where`] (an AMQP client names its connection there).
const KEPT_BYTES: usize = 8 * 1024;

/// One connection through the proxy.
#[derive(Default)]
struct Link {
    /// The first [`KEPT_BYTES`] the client sent.
    seen: Mutex<Vec<u8>>,
    /// Nothing is forwarded either way while set.
    frozen: AtomicBool,
}

/// A proxy from a port of its own on 127.0.0.1 to `target`.
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The accept loop and every connection's copy task, aborted by `cut`.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Every connection made through it.
    links: Arc<Mutex<Vec<Arc<Link>>>>,
}

impl TcpProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let (held, known) = (tasks.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let link = Arc::new(Link::default());
                known
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(link.clone());
                let copy = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let (in_read, in_write) = inbound.into_split();
                        let (out_read, out_write) = outbound.into_split();
                        tokio::join!(
                            pump(in_read, out_write, link.clone(), true),
                            pump(out_read, in_write, link, false),
                        );
                    }
                });
                held.lock().unwrap_or_else(|e| e.into_inner()).push(copy);
            }
        });
        tasks.lock().unwrap_or_else(|e| e.into_inner()).push(accept);
        Ok(Self { addr, tasks, links })
    }

    /// An AMQP URL (guest) through the proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Stops forwarding, both ways and for good, on every open connection
    /// whose client's first bytes contain `pattern` (an AMQP connection
    /// name, say), keeping its sockets open; later connections are not
    /// touched. How many were frozen.
    pub fn freeze_where(&self, pattern: &[u8]) -> usize {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let mut frozen = 0;
        for link in links.iter() {
            let seen = link.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.windows(pattern.len()).any(|w| w == pattern) {
                link.frozen.store(true, Ordering::Relaxed);
                frozen += 1;
            }
        }
        frozen
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

/// Copies `from` to `to` until either ends; holds (reads nothing more,
/// writes nothing) while `link` is frozen. `record`: keep the first bytes.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: Arc<Link>, record: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if record {
            let mut seen = link.seen.lock().unwrap_or_else(|e| e.into_inner());
            let room = KEPT_BYTES.saturating_sub(seen.len());
            seen.extend_from_slice(&buf[..n.min(room)]);
        }
        while link.frozen.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
