//! The HTTP server: the accept loop and each connection, on hyper's HTTP/1
//! connection builder (`axum::serve` has no time-outs and no connection
//! limit).
//!
//! - The loop never dies and never spins: an accept error for one
//!   connection is skipped, running out of file descriptors sheds an idle
//!   connection and backs off (5 ms, doubling to 500 ms) before trying again.
//! - Each connection registers with the [`Tracker`], which cuts it at its
//!   header, idle or stall time-out and sheds idle connections at the
//!   limit; a connection refused because every open one is busy gets a
//!   one-line 503 (written if the socket takes it at once) and is closed.
//! - On shutdown the listener closes, each connection finishes the response
//!   in hand and closes (event streams end on their own), and `serve`
//!   returns when the last one is gone.
//!
//! HTTP/1.1 only, as before (`axum::serve` without its `http2` feature):
//! browsers speak HTTP/2 only over TLS, which a proxy in front terminates.

use super::conns::{Conn, Tracker};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// File descriptors kept for everything but HTTP connections (broker
/// connections (about a dozen, with their reactors), snapshot files, the
/// management API client, HTTP sockets being shed but not yet closed).
pub const RESERVED_FDS: u64 = 320;
/// Largest read or write buffer of a connection: request heads must fit.
const MAX_BUF: usize = 64 * 1024;
/// Backoff after running out of file descriptors: first and longest.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// What a refused connection is told, if its socket takes it at once.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 76\r\n\r\n{\"error\": \"too many connections, every one busy with a request: try again\"}\n";

/// Raises this process's soft limit of open files to its hard limit, so a
/// flood of connections meets the connection limit before `EMFILE`.
/// Answers the soft limit in force (`None`: unlimited or unknown).
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return limit.maximum,
            Err(e) => tracing::warn!("cannot raise the open-files limit to its maximum: {e}"),
        }
    }
    limit.current
}

/// The connection limit to enforce: `wanted`, or fewer if the open-files
/// limit leaves less room (keeping [`RESERVED_FDS`] for the rest).
pub fn connection_budget(wanted: usize, fd_limit: Option<u64>) -> usize {
    match fd_limit {
        Some(limit) => {
            let room = usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
            wanted.min(room.max(1))
        }
        None => wanted,
    }
}

/// Whether an accept error is about the process's resources (then back off)
/// rather than the one connection that failed (then go on at once).
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Serves `router` on `listener` until `closing` turns true, then waits for
/// the open connections to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tracker: Arc<Tracker>,
    mut closing: watch::Receiver<bool>,
) -> io::Result<()> {
    let sweeper = tokio::spawn({
        let tracker = tracker.clone();
        let closing = closing.clone();
        async move {
            let mut tick = tokio::time::interval(tracker.sweep_period());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                tracker.sweep();
                // Time-outs still apply while connections finish.
                if *closing.borrow() && tracker.is_empty() {
                    return;
                }
            }
        }
    });
    let service = TowerToHyperService::new(router);
    let mut backoff = BACKOFF_MIN;
    let mut exhausted_since: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shut(&mut closing) => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                backoff = BACKOFF_MIN;
                if let Some(since) = exhausted_since.take() {
                    tracing::info!(
                        "accepting connections again after {:?} out of file descriptors",
                        since.elapsed()
                    );
                }
                stream
            }
            Err(e) if out_of_resources(&e) => {
                if exhausted_since.is_none() {
                    exhausted_since = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        open = tracker.len(),
                        "cannot accept a connection ({e}): shedding idle connections and backing off"
                    );
                }
                tracker.shed_one();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Err(e) => {
                tracing::debug!("accept: {e}");
                continue;
            }
        };
        let Some(conn) = tracker.admit() else {
            refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            conn,
            service.clone(),
            tracker.clone(),
            closing.clone(),
        ));
    }
    drop(listener);
    tracker.wait_empty().await;
    let _ = sweeper.await;
    Ok(())
}

/// Resolves once `closing` is true (or its sender is gone).
async fn shut(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

/// Tells a connection refused at the limit why, if its socket takes the
/// answer at once, and closes it.
fn refuse(stream: TcpStream) {
    let _ = stream.try_write(REFUSED);
}

/// Serves one connection until it ends, is cut, or the server shuts down.
async fn connection(
    stream: TcpStream,
    conn: Arc<Conn>,
    service: TowerToHyperService<Router>,
    tracker: Arc<Tracker>,
    mut closing: watch::Receiver<bool>,
) {
    let io = TokioIo::new(Watched {
        inner: stream,
        conn: conn.clone(),
    });
    let service = Tracked {
        inner: service,
        conn: conn.clone(),
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .max_buf_size(MAX_BUF)
        // Time-outs are the tracker's (hyper's would need a timer per
        // connection and cannot tell idle from slow).
        .header_read_timeout(None);
    let http = builder.serve_connection(io, service);
    tokio::pin!(http);
    let outcome = tokio::select! {
        r = http.as_mut() => Some(r),
        _ = conn.closed() => None,
        _ = shut(&mut closing) => {
            http.as_mut().graceful_shutdown();
            tokio::select! {
                r = http.as_mut() => Some(r),
                _ = conn.closed() => None,
            }
        }
    };
    if let Some(Err(e)) = outcome {
        tracing::debug!("HTTP connection: {e}");
    }
    tracker.remove(&conn);
}

/// The socket, telling the tracker when bytes come and go.
struct Watched {
    /// The socket.
    inner: TcpStream,
    /// Its connection's state.
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.on_progress();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.on_progress();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router, telling the tracker when a request starts and its response
/// ends.
#[derive(Clone)]
struct Tracked {
    /// The router as a hyper service.
    inner: TowerToHyperService<Router>,
    /// The connection's state.
    conn: Arc<Conn>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Guarded>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.conn.request_started();
        let conn = self.conn.clone();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            conn.response_started();
            Ok(response.map(|body| Guarded {
                inner: body,
                conn,
                done: false,
            }))
        })
    }
}

/// A response body that marks its connection idle once written or dropped,
/// and counts each poll as progress (a client that stops reading stops the
/// polls).
struct Guarded {
    /// The body.
    inner: Body,
    /// The connection's state.
    conn: Arc<Conn>,
    /// Whether the connection was told already.
    done: bool,
}

impl Guarded {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.conn.response_done();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.conn.on_progress();
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_budget_leaves_room_for_other_files() {
        assert_eq!(connection_budget(1024, None), 1024);
        assert_eq!(connection_budget(1024, Some(1_048_576)), 1024);
        assert_eq!(connection_budget(4096, Some(1024)), 1024 - 320);
        assert_eq!(connection_budget(4096, Some(100)), 1);
    }

    #[test]
    fn only_resource_errors_back_off() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(out_of_resources(&io::Error::from_raw_os_error(code)));
        }
        for code in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM] {
            assert!(!out_of_resources(&io::Error::from_raw_os_error(code)));
        }
    }

    #[test]
    fn the_refusal_is_a_well_formed_response() {
        let text = std::str::from_utf8(REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }
}
