//! The agent's connections to an `http://` worker: `TCP_NODELAY`, and
//! `TCP_QUICKACK` re-armed after every read and write.
//!
//! A worker that writes its response's head and body in two writes with
//! Nagle's algorithm on (Python's `http.server` does, unbuffered) sends the
//! second write only once the agent has ACKed the first. Linux delays that
//! ACK (up to ~40 ms) while the connection looks interactive, which a
//! kept-alive request/response connection always does: ~40 ms on every
//! task. `TCP_QUICKACK` takes the socket out of that mode, but only until
//! the next exchange puts it back, so it is set again after each read and
//! each write (one `setsockopt`, well under a microsecond). The agent then
//! ACKs the head at once and the body follows.
//!
//! Only plain `http://`: reqwest keeps its sockets to itself, so `https://`
//! workers go through reqwest as before (with `TCP_NODELAY`, its default).

use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

/// Connects like hyper's [`HttpConnector`] (no proxy, `http://` only) and
/// hands out [`QuickAckStream`]s.
#[derive(Debug, Clone)]
pub struct QuickAckConnector {
    /// The plain connector: TCP_NODELAY, the connect timeout.
    inner: HttpConnector,
}

impl QuickAckConnector {
    /// A connector giving up on a connection attempt after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(connect_timeout));
        Self { inner }
    }
}

/// A connection to the worker that keeps re-arming `TCP_QUICKACK`.
#[derive(Debug)]
pub struct QuickAckStream {
    /// The socket.
    io: TokioIo<TcpStream>,
}

impl QuickAckStream {
    /// Sets `TCP_QUICKACK` again. A failure (a socket already closed)
    /// only loses the optimisation.
    fn rearm(&self) {
        let _ = rustix::net::sockopt::set_tcp_quickack(self.io.inner(), true);
    }

    /// Whether the socket has `TCP_NODELAY` set (for tests).
    pub fn nodelay(&self) -> bool {
        self.io.inner().nodelay().unwrap_or(false)
    }
}

type Connecting = Pin<
    Box<
        dyn Future<Output = Result<QuickAckStream, Box<dyn std::error::Error + Send + Sync>>>
            + Send,
    >,
>;

impl tower_service::Service<Uri> for QuickAckConnector {
    type Response = QuickAckStream;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.inner, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = tower_service::Service::<Uri>::call(&mut self.inner, uri);
        Box::pin(async move {
            let stream = QuickAckStream {
                io: connecting.await?,
            };
            stream.rearm();
            Ok(stream)
        })
    }
}

impl Read for QuickAckStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_ready() {
            this.rearm();
        }
        read
    }
}

impl Write for QuickAckStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        if written.is_ready() {
            this.rearm();
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if written.is_ready() {
            this.rearm();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connection for QuickAckStream {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_service::Service;

    #[tokio::test]
    async fn worker_connections_have_nodelay_and_quickack() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let mut connector = QuickAckConnector::new(Duration::from_secs(2));
        let uri: Uri = format!("http://{addr}/").parse().unwrap();
        let stream = connector.call(uri).await.unwrap();
        assert!(stream.nodelay());
        let quickack = rustix::net::sockopt::tcp_quickack(stream.io.inner()).unwrap();
        assert!(quickack, "TCP_QUICKACK is armed on a fresh connection");
        drop(accept);
    }
}
