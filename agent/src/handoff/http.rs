//! HTTP hand-off: POST the payload to the worker's URL.
//!
//! | response | outcome |
//! |---|---|
//! | 2xx | success; the body is the next payload; `x-guildhall-next-stage` may name another stage or `-` |
//! | 2xx with `x-guildhall-fan-out: ndjson` | a fan-out: the body lists child tasks, one per line ([`super::fanout`]); a bad one is a permanent failure, class `invalid_fan_out` |
//! | 408, 429 | retryable (the worker asks to be tried again later) |
//! | other 4xx, 1xx, 3xx | permanent |
//! | 5xx | retryable |
//! | connection error | retryable, class `connection` |
//! | no answer within the task timeout | retryable, class `timeout` (a supervised worker is restarted instead and the task given back) |
//!
//! The request carries the task's id, stage, attempt, idempotency key,
//! priority, `traceparent` and, on a child task, `x-guildhall-parent`.
//!
//! A next stage that is not a valid stage name (bad characters, bytes that
//! are not ASCII, over 255 bytes) is a permanent failure, class
//! `invalid_next_stage`; whether a valid one may be used is the agent's
//! rule ([`crate::declare`]).
//!
//! A failure's error is `HTTP <code>: <first 1 KiB of the body>`; its class is
//! the worker's `x-guildhall-error-class` header when that is a valid class,
//! else `http_<code>`. 408 and 429 are retried (unlike other 4xx) because they
//! say "not now", not "bad input".
//!
//! An `http://` worker is reached through hyper with the agent's own
//! connector ([`super::quickack`]: `TCP_NODELAY`, and `TCP_QUICKACK` re-armed
//! after every read and write, so a worker that writes its head and body
//! apart with Nagle on does not stall ~40 ms a task); an `https://` one
//! through reqwest. Both keep connections alive, follow no redirects and
//! use no proxy.

use super::quickack::QuickAckConnector;
use super::{Failure, NextStage, Outcome, TaskInput, valid_error_class};
use crate::config::{ConfigError, check_worker_url};
use bytes::Bytes;
use guildhall_proto::Stage;
use guildhall_proto::headers::{END_OF_PIPELINE, http as h};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use reqwest::header::CONTENT_TYPE;
use std::time::Duration;

/// Largest response body taken as the next payload.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Bytes of a failure response's body quoted in the error.
const ERROR_BODY_BYTES: usize = 1024;

/// Posts each task to one URL.
#[derive(Debug)]
pub struct HttpWorker {
    /// How requests reach the worker.
    transport: Transport,
    /// Where tasks are posted.
    url: reqwest::Url,
    /// Longest a task may take, request to the end of the body.
    timeout: Duration,
}

/// A plain `http://` worker goes through hyper with the agent's own
/// connector ([`QuickAckConnector`]: no ~40 ms stall on a worker that
/// writes its head and body apart); an `https://` one through reqwest.
#[derive(Debug)]
enum Transport {
    /// Shared connection pool; no proxy, no redirects, the task timeout.
    Reqwest(reqwest::Client),
    /// Shared connection pool over [`QuickAckConnector`] (hyper follows no
    /// redirects and uses no proxy).
    Plain(hyper_util::client::legacy::Client<QuickAckConnector, Full<Bytes>>),
}

impl HttpWorker {
    /// A worker posting to `url`, giving up on a task after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, ConfigError> {
        let url = check_worker_url(url)?;
        let connect_timeout = timeout.min(Duration::from_secs(5));
        let transport = if url.scheme() == "http" {
            Transport::Plain(
                hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                    .build(QuickAckConnector::new(connect_timeout)),
            )
        } else {
            Transport::Reqwest(
                reqwest::Client::builder()
                    .timeout(timeout)
                    .connect_timeout(connect_timeout)
                    .redirect(reqwest::redirect::Policy::none())
                    .no_proxy()
                    .build()
                    .map_err(|e| ConfigError::invalid("--worker-url", e.to_string()))?,
            )
        };
        Ok(Self {
            transport,
            url,
            timeout,
        })
    }

    /// The worker's host and port (for the readiness probe).
    pub fn ready_addr(&self) -> Option<(String, u16)> {
        // IPv6 hosts come bracketed (`[::1]`); connecting wants them bare.
        let host = self
            .url
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']');
        Some((host.to_owned(), self.url.port_or_known_default()?))
    }

    /// Posts one task and maps the answer to an outcome.
    pub async fn handle(&self, task: &TaskInput) -> Outcome {
        let mut headers = vec![
            (CONTENT_TYPE.as_str(), "application/octet-stream".to_owned()),
            (h::TASK_ID, task.task_id.as_str().to_owned()),
            (h::STAGE, task.stage.as_str().to_owned()),
            (h::ATTEMPT, task.attempt.to_string()),
            (h::IDEMPOTENCY_KEY, task.idempotency_key.clone()),
            (h::PRIORITY, task.priority.to_string()),
        ];
        if let Some(tp) = &task.traceparent {
            headers.push((h::TRACEPARENT, tp.clone()));
        }
        if let Some(parent) = &task.parent {
            headers.push((h::PARENT, parent.as_str().to_owned()));
        }
        match &self.transport {
            Transport::Reqwest(client) => self.via_reqwest(client, headers, task).await,
            Transport::Plain(client) => {
                let posted = self.via_hyper(client, headers, task);
                match tokio::time::timeout(self.timeout, posted).await {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::Failure(Failure::timeout(format!(
                        "no complete answer from {} within {}",
                        self.url,
                        humantime::format_duration(self.timeout)
                    ))),
                }
            }
        }
    }

    async fn via_reqwest(
        &self,
        client: &reqwest::Client,
        headers: Vec<(&str, String)>,
        task: &TaskInput,
    ) -> Outcome {
        let mut request = client.post(self.url.clone()).body(task.payload.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(err) => return Outcome::Failure(request_error(&err)),
        };
        let status = response.status().as_u16();
        let answer = Answer::read(response.headers());
        let mut body = Body::new(status);
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if let Some(full) = body.push(&chunk) {
                        return full;
                    }
                    if body.done {
                        break;
                    }
                }
                Ok(None) => break,
                Err(err) => return Outcome::Failure(request_error(&err)),
            }
        }
        answer.map(status, body.bytes)
    }

    async fn via_hyper(
        &self,
        client: &hyper_util::client::legacy::Client<QuickAckConnector, Full<Bytes>>,
        headers: Vec<(&str, String)>,
        task: &TaskInput,
    ) -> Outcome {
        let mut request = hyper::Request::post(self.url.as_str());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = match request.body(Full::new(Bytes::from(task.payload.clone()))) {
            Ok(r) => r,
            Err(err) => {
                return Outcome::Failure(Failure::retryable("connection", error_chain(&err)));
            }
        };
        let response = match client.request(request).await {
            Ok(response) => response,
            Err(err) => {
                return Outcome::Failure(Failure::retryable("connection", error_chain(&err)));
            }
        };
        let status = response.status().as_u16();
        let answer = Answer::read(response.headers());
        let mut incoming = response.into_body();
        let mut body = Body::new(status);
        while let Some(frame) = incoming.frame().await {
            match frame {
                Ok(frame) => {
                    let Ok(chunk) = frame.into_data() else {
                        continue; // trailers
                    };
                    if let Some(full) = body.push(&chunk) {
                        return full;
                    }
                    if body.done {
                        break;
                    }
                }
                Err(err) => {
                    return Outcome::Failure(Failure::retryable("connection", error_chain(&err)));
                }
            }
        }
        answer.map(status, body.bytes)
    }
}

/// The worker's answer headers: next stage, error class, priority and the
/// fan-out's. A header that is there but not text (bytes over 0x7f) is read
/// lossily, so it is refused as a value instead of ignored as absent (an
/// unreadable next stage must not send the result to the default).
struct Answer {
    /// `x-guildhall-next-stage`.
    next: Option<String>,
    /// `x-guildhall-error-class`.
    class: Option<String>,
    /// `x-guildhall-priority`.
    priority: Option<String>,
    /// `x-guildhall-fan-out`.
    fan_out: Option<String>,
    /// `Content-Type` (read only for a fan-out).
    content_type: Option<String>,
    /// `x-guildhall-join`.
    join: Option<String>,
    /// `x-guildhall-on-child-failure`.
    on_child_failure: Option<String>,
}

impl Answer {
    fn read(headers: &reqwest::header::HeaderMap) -> Self {
        let header = |name: &str| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        Self {
            next: header(h::NEXT_STAGE),
            class: header(h::ERROR_CLASS),
            priority: header(h::PRIORITY),
            fan_out: header(h::FAN_OUT),
            content_type: header(CONTENT_TYPE.as_str()),
            join: header(h::JOIN),
            on_child_failure: header(h::ON_CHILD_FAILURE),
        }
    }

    /// The outcome of a response with these headers.
    fn map(&self, status: u16, body: Vec<u8>) -> Outcome {
        if let (Some(fan_out), true) = (&self.fan_out, (200..300).contains(&status)) {
            // A fan-out's children keep the task's priority: the
            // priority header is not read.
            // The children's default stage: a bad one refuses the fan-out.
            let next = match next_stage(self.next.as_deref()) {
                Ok(next) => next,
                Err(failure) => return super::fanout::invalid(failure.error),
            };
            return super::fanout::from_http(
                fan_out,
                self.content_type.as_deref(),
                self.join.as_deref(),
                self.on_child_failure.as_deref(),
                next,
                &body,
            );
        }
        map_response_with_priority(
            status,
            self.next.as_deref(),
            self.class.as_deref(),
            self.priority.as_deref(),
            body,
        )
    }
}

/// A response body read up to its limit: the whole of a success's (up to
/// [`MAX_RESPONSE_BYTES`]), only the start of a failure's (it is only quoted).
struct Body {
    /// What was read.
    bytes: Vec<u8>,
    /// The limit for this status.
    limit: usize,
    /// A failure's quoted start is complete: stop reading.
    done: bool,
}

impl Body {
    fn new(status: u16) -> Self {
        let limit = if (200..300).contains(&status) {
            MAX_RESPONSE_BYTES
        } else {
            ERROR_BODY_BYTES
        };
        Self {
            bytes: Vec::new(),
            limit,
            done: false,
        }
    }

    /// Takes a chunk; `Some` when a success's body is over the limit.
    fn push(&mut self, chunk: &[u8]) -> Option<Outcome> {
        if self.bytes.len() + chunk.len() > self.limit {
            if self.limit == MAX_RESPONSE_BYTES {
                return Some(Outcome::Failure(Failure::retryable(
                    "output_too_large",
                    format!("response body over {MAX_RESPONSE_BYTES} bytes"),
                )));
            }
            let room = self.limit - self.bytes.len();
            self.bytes.extend_from_slice(&chunk[..room]);
            self.done = true;
            return None;
        }
        self.bytes.extend_from_slice(chunk);
        None
    }
}

/// Maps a transport error (no complete response) to a retryable failure.
fn request_error(err: &reqwest::Error) -> Failure {
    if err.is_timeout() {
        Failure::timeout(error_chain(err))
    } else {
        Failure::retryable("connection", error_chain(err))
    }
}

pub(crate) use guildhall_broker::error_chain;

/// Maps a complete response to an outcome (see the module docs for the table).
pub fn map_response(
    status: u16,
    next_stage: Option<&str>,
    error_class: Option<&str>,
    body: Vec<u8>,
) -> Outcome {
    map_response_with_priority(status, next_stage, error_class, None, body)
}

/// The error class of a success whose `x-guildhall-priority` is not 0-9.
pub const INVALID_PRIORITY_CLASS: &str = "invalid_priority";

/// [`map_response`] with the response's `x-guildhall-priority` header: a
/// success sets the next stage's priority; one that is not 0-9 makes the
/// success a permanent failure (class `invalid_priority`).
pub fn map_response_with_priority(
    status: u16,
    next_stage: Option<&str>,
    error_class: Option<&str>,
    priority: Option<&str>,
    body: Vec<u8>,
) -> Outcome {
    if (200..300).contains(&status) {
        let priority = match priority.map(str::parse::<guildhall_proto::Priority>) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(err)) => {
                return Outcome::Failure(Failure::permanent(
                    INVALID_PRIORITY_CLASS,
                    format!("worker answered {}: {err}", h::PRIORITY),
                ));
            }
        };
        let next = match self::next_stage(next_stage) {
            Ok(next) => next,
            Err(failure) => return Outcome::Failure(failure),
        };
        return Outcome::Success {
            payload: body,
            next,
            priority,
        };
    }
    let class = match error_class.map(str::trim) {
        Some(c) if valid_error_class(c) => c.to_owned(),
        _ => format!("http_{status}"),
    };
    let end = body.len().min(ERROR_BODY_BYTES);
    let text = String::from_utf8_lossy(&body[..end]);
    let error = format!("HTTP {status}: {}", text.trim());
    let retryable = status >= 500 || status == 408 || status == 429;
    Outcome::Failure(Failure {
        error,
        class,
        retryable,
        timed_out: false,
    })
}

/// Reads `x-guildhall-next-stage`: absent or empty for the default, `-`
/// for the end; a name that is not a stage is a permanent failure, class
/// `invalid_next_stage`.
fn next_stage(value: Option<&str>) -> Result<NextStage, Failure> {
    match value.map(str::trim) {
        None | Some("") => Ok(NextStage::Default),
        Some(END_OF_PIPELINE) => Ok(NextStage::End),
        Some(name) => Stage::new(name).map(NextStage::Stage).map_err(|err| {
            Failure::permanent(
                "invalid_next_stage",
                format!("worker answered {}: {err}", h::NEXT_STAGE),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(outcome: Outcome) -> Failure {
        match outcome {
            Outcome::Failure(f) => f,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn success_takes_the_body_and_the_next_stage_override() {
        assert_eq!(
            map_response(200, None, None, b"out".to_vec()),
            Outcome::Success {
                payload: b"out".to_vec(),
                next: NextStage::Default,
                priority: None,
            }
        );
        assert_eq!(
            map_response(204, Some("report"), None, Vec::new()),
            Outcome::Success {
                payload: Vec::new(),
                next: NextStage::Stage("report".parse().unwrap()),
                priority: None,
            }
        );
        assert_eq!(
            map_response(201, Some("-"), None, b"x".to_vec()),
            Outcome::Success {
                payload: b"x".to_vec(),
                next: NextStage::End,
                priority: None,
            }
        );
    }

    #[test]
    fn the_worker_may_set_the_next_priority_and_a_bad_one_is_a_permanent_failure() {
        let ok = map_response_with_priority(200, None, None, Some("7"), Vec::new());
        assert!(
            matches!(ok, Outcome::Success { priority: Some(p), .. } if p.get() == 7),
            "{ok:?}"
        );
        for bad in ["10", "-1", "high", "", "\u{fffd}"] {
            let f = failure(map_response_with_priority(
                200,
                None,
                None,
                Some(bad),
                Vec::new(),
            ));
            assert_eq!(f.class, INVALID_PRIORITY_CLASS, "{bad}");
            assert!(!f.retryable);
            assert!(f.error.contains("x-guildhall-priority"), "{}", f.error);
        }
        // A failure's priority header is not read.
        let f = failure(map_response_with_priority(
            500,
            None,
            None,
            Some("x"),
            Vec::new(),
        ));
        assert_eq!(f.class, "http_500");
    }

    #[test]
    fn an_invalid_next_stage_is_a_permanent_failure() {
        let long = "a".repeat(10 * 1024);
        for bad in [
            "no such/stage",
            "\u{fffd}\u{fffd}",
            "stage\u{fffd}",
            &long,
            "_x",
            "x.y",
        ] {
            let f = failure(map_response(200, Some(bad), None, Vec::new()));
            assert!(!f.retryable, "{bad}");
            assert_eq!(f.class, "invalid_next_stage", "{bad}");
            assert!(f.error.contains("x-guildhall-next-stage"), "{}", f.error);
            assert!(
                f.error.len() < 400,
                "the value is quoted cut short: {}",
                f.error
            );
        }
    }

    #[test]
    fn client_errors_are_permanent_and_server_errors_retryable() {
        let f = failure(map_response(422, None, None, b"bad field".to_vec()));
        assert_eq!(
            f,
            Failure::permanent("http_422", "HTTP 422: bad field".to_owned())
        );
        let f = failure(map_response(
            503,
            None,
            Some("db_timeout"),
            b"later".to_vec(),
        ));
        assert_eq!(
            f,
            Failure::retryable("db_timeout", "HTTP 503: later".to_owned())
        );
        let f = failure(map_response(500, None, Some("Bad Class!"), Vec::new()));
        assert_eq!(f.class, "http_500");
        assert!(f.retryable);
        assert!(failure(map_response(429, None, None, Vec::new())).retryable);
        assert!(failure(map_response(408, None, None, Vec::new())).retryable);
        assert!(!failure(map_response(302, None, None, Vec::new())).retryable);
    }

    #[test]
    fn the_error_quotes_at_most_one_kib_of_the_body() {
        let f = failure(map_response(400, None, None, vec![b'x'; 5000]));
        assert_eq!(f.error.len(), "HTTP 400: ".len() + 1024);
    }

    #[tokio::test]
    async fn transport_errors_are_retryable_connection_failures() {
        // Port 1 on loopback: nothing listens there.
        let worker = HttpWorker::new("http://127.0.0.1:1/task", Duration::from_secs(2)).unwrap();
        let task = TaskInput {
            task_id: "t1".parse().unwrap(),
            stage: "s".parse().unwrap(),
            attempt: 1,
            idempotency_key: "t1/s/1".into(),
            traceparent: None,
            priority: Default::default(),
            payload: b"x".to_vec(),
            parent: None,
        };
        let f = failure(worker.handle(&task).await);
        assert_eq!(f.class, "connection");
        assert!(f.retryable);
    }

    #[tokio::test]
    async fn a_worker_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accept and hold the connection without ever answering.
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(socket);
        });
        let worker =
            HttpWorker::new(&format!("http://{addr}/"), Duration::from_millis(300)).unwrap();
        let task = TaskInput {
            task_id: "t1".parse().unwrap(),
            stage: "s".parse().unwrap(),
            attempt: 1,
            idempotency_key: "t1/s/1".into(),
            traceparent: None,
            priority: Default::default(),
            payload: Vec::new(),
            parent: None,
        };
        let f = failure(worker.handle(&task).await);
        assert_eq!(f.class, "timeout");
        assert!(f.retryable && f.timed_out);
        server.abort();
    }

    /// A kept-alive worker that writes its head and its body in two writes
    /// with Nagle's algorithm on (as Python's `http.server` does): each
    /// body waits for the agent's ACK of the head. With delayed ACKs that
    /// is ~40 ms a task; the agent's connector ACKs at once.
    #[tokio::test]
    async fn a_worker_writing_head_and_body_apart_does_not_stall() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(false).unwrap();
            let mut buf = vec![0u8; 4096];
            let mut seen = Vec::new();
            loop {
                let n = socket.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
                // Each request has a 2-byte body after its head.
                while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    if seen.len() < end + 4 + 2 {
                        break;
                    }
                    seen.drain(..end + 4 + 2);
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n";
                    socket.write_all(head).await.unwrap();
                    socket.write_all(b"ok").await.unwrap();
                }
            }
        });
        let worker = HttpWorker::new(&format!("http://{addr}/"), Duration::from_secs(5)).unwrap();
        let task = TaskInput {
            task_id: "t1".parse().unwrap(),
            stage: "s".parse().unwrap(),
            attempt: 1,
            idempotency_key: "t1/s/1".into(),
            traceparent: None,
            priority: Default::default(),
            payload: b"in".to_vec(),
            parent: None,
        };
        const TASKS: u32 = 40;
        let t0 = std::time::Instant::now();
        for _ in 0..TASKS {
            let outcome = worker.handle(&task).await;
            assert!(matches!(outcome, Outcome::Success { .. }), "{outcome:?}");
        }
        let each = t0.elapsed() / TASKS;
        // A stall is at least 40 ms (Linux's shortest delayed ACK) on most
        // tasks; without one a task is about a millisecond here.
        assert!(each < Duration::from_millis(15), "{each:?} per task");
        server.abort();
    }

    /// A fan-out answer through the real client: the child lines and the
    /// headers are read, and the request names the task's parent.
    #[tokio::test]
    async fn a_fan_out_answer_is_read_and_the_parent_is_sent() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            let body = "{\"payload\":\"a\"}\n\n{\"payload\":{\"k\":1},\"stage\":\"s2\"}\n";
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                 x-guildhall-fan-out: ndjson\r\nx-guildhall-join: merge\r\n\
                 x-guildhall-next-stage: kids\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            socket.write_all(head.as_bytes()).await.unwrap();
            socket.write_all(body.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&seen).to_lowercase()
        });
        let worker = HttpWorker::new(&format!("http://{addr}/"), Duration::from_secs(5)).unwrap();
        let task = TaskInput {
            task_id: "P-1:2".parse().unwrap(),
            stage: "s".parse().unwrap(),
            attempt: 1,
            idempotency_key: "P-1:2/s/1".into(),
            traceparent: None,
            priority: Default::default(),
            payload: Vec::new(),
            parent: Some("P-1".parse().unwrap()),
        };
        let Outcome::FanOut(f) = worker.handle(&task).await else {
            panic!("not a fan-out")
        };
        assert_eq!(f.children.len(), 2);
        assert_eq!(f.children[1].payload, br#"{"k":1}"#);
        assert_eq!(f.children[1].stage, Some("s2".parse().unwrap()));
        assert_eq!(f.next, NextStage::Stage("kids".parse().unwrap()));
        assert_eq!(
            f.join,
            super::super::fanout::Join::Stage("merge".parse().unwrap())
        );
        let request = server.await.unwrap();
        assert!(request.contains("x-guildhall-parent: p-1\r\n"), "{request}");
    }

    #[test]
    fn a_fan_out_header_on_a_failure_is_not_read() {
        let answer = Answer {
            next: None,
            class: None,
            priority: None,
            fan_out: Some("ndjson".into()),
            content_type: Some("application/x-ndjson".into()),
            join: None,
            on_child_failure: None,
        };
        assert_eq!(failure(answer.map(503, Vec::new())).class, "http_503");
        let f = failure(
            Answer {
                next: Some("bad stage".into()),
                ..answer
            }
            .map(200, b"{\"payload\":1}".to_vec()),
        );
        // The children's default stage: the fan-out is refused.
        assert_eq!(f.class, "invalid_fan_out");
        assert!(f.error.contains("x-guildhall-next-stage"), "{}", f.error);
    }
}
