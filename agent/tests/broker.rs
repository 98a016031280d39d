//! The agent against the real RabbitMQ (`AMQP_URL`, default the local
//! broker): each test runs agents in process in a namespace of its own and
//! deletes everything under it at the end.
//!
//! Connection losses are caused the way they happen in production: the
//! broker closes the agent's connection (through the management API, as the
//! coordinator does for a frozen agent). The broker itself is never
//! restarted here: other tests share it.

use futures_lite::StreamExt;
use guildhall_agent::{AgentConfig, AgentHandle, RetryPolicy, SimulateSpec, WorkerSpec};
use guildhall_broker::task::{header_str, header_u64};
use guildhall_broker::topology::{StreamRetention, declare_stage, ensure_events_stream};
use guildhall_broker::{
    EventPublisher, EventPublisherConfig, Management, Publisher, TaskMeta, connect, now_ms,
};
use guildhall_proto::command::{decode as decode_reply, encode as encode_command};
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{
    AgentId, AgentState, Command, CommandMessage, CommandReply, Event, Marker, Names, Namespace,
    Stage, TaskAbandoned, TaskId, WorkerResult,
};
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn management_url() -> String {
    std::env::var("GUILDHALL_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into())
}

/// Polls `check` every 50 ms until it yields a value, or panics after `timeout`.
async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One test's namespace, connection and helpers.
struct TestEnv {
    names: Names,
    conn: Connection,
    channel: Channel,
    publisher: Publisher,
    /// Agents started, so the clean-up can close their connections (a live
    /// agent's exclusive command queue cannot be deleted).
    agents: Arc<Mutex<Vec<AgentId>>>,
}

/// Runs `body` in a fresh namespace, then deletes everything under it, even
/// if the body panicked.
async fn with_namespace<F, Fut>(body: F)
where
    F: FnOnce(TestEnv) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let ns: Namespace = format!("t-agent-{:08x}", rand::random::<u32>())
        .parse()
        .unwrap();
    let names = Names::new(ns);
    let url = guildhall_broker::AmqpUrl::parse(&amqp_url()).unwrap();
    let conn = connect(&url, "guildhall-agent-tests").await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let publisher = Publisher::open(&conn).await.unwrap();
    ensure_events_stream(&conn, &names, &StreamRetention::default())
        .await
        .unwrap();
    let prefix = names.prefix();
    let agents = Arc::new(Mutex::new(Vec::new()));
    let env = TestEnv {
        names: names.clone(),
        conn,
        channel,
        publisher,
        agents: agents.clone(),
    };
    let result = tokio::spawn(body(env)).await;
    let management = Management::new(&management_url(), url.vhost()).unwrap();
    // Agents still running (the body panicked) hold exclusive command queues
    // that cannot be deleted: close their connections. A new connection shows
    // in the management API only after its next stats refresh, so retry.
    let agents = agents.lock().unwrap().clone();
    eventually(
        Duration::from_secs(20),
        "the namespace to be deleted",
        || async {
            for agent in &agents {
                let name = names.agent_connection_name(agent);
                let _ = management.close_connections_named(&name, "test over").await;
            }
            management.delete_all_with_prefix(&prefix).await.ok()
        },
    )
    .await;
    if let Err(err) = result {
        std::panic::resume_unwind(err.into_panic());
    }
}

impl TestEnv {
    fn stage(&self, name: &str) -> Stage {
        name.parse().unwrap()
    }

    /// A config for this namespace with fast heartbeats and event flushes.
    fn config(&self, stage: &str, next: Option<&str>, worker: WorkerSpec) -> AgentConfig {
        let id: AgentId = format!("{stage}-{:04x}", rand::random::<u16>())
            .parse()
            .unwrap();
        let mut config = AgentConfig::new(self.stage(stage), worker)
            .with_amqp_url(amqp_url())
            .with_namespace(self.names.namespace().clone())
            .with_next(next.map(|n| self.stage(n)))
            .with_id(id)
            .with_heartbeat(Duration::from_millis(200));
        config.flush_interval = Duration::from_millis(10);
        config
    }

    /// A management API client for the test broker.
    fn management(&self) -> Management {
        let url = guildhall_broker::AmqpUrl::parse(&amqp_url()).unwrap();
        Management::new(&management_url(), url.vhost()).unwrap()
    }

    /// Waits until the management API lists the agent's connection (it
    /// shows a new connection only after its next stats refresh, ~5 s).
    async fn wait_for_connection(&self, agent: &AgentId) {
        let management = self.management();
        let name = self.names.agent_connection_name(agent);
        eventually(
            Duration::from_secs(20),
            "the agent's connection to be listed",
            || async {
                let listed = management.connections().await.ok()?;
                listed
                    .iter()
                    .any(|c| c.user_provided_name.as_deref() == Some(name.as_str()))
                    .then_some(())
            },
        )
        .await;
    }

    /// Has the broker close the agent's connection, as the coordinator does
    /// to a frozen agent.
    async fn close_connection(&self, agent: &AgentId) {
        let management = self.management();
        let name = self.names.agent_connection_name(agent);
        eventually(
            Duration::from_secs(20),
            "the agent's connection to be closed",
            || async {
                let closed = management
                    .close_connections_named(&name, "closed by a test")
                    .await
                    .ok()?;
                (closed > 0).then_some(())
            },
        )
        .await;
    }

    /// Declares `queue` as an exclusive queue of the test's connection, as
    /// an agent declares its command queue, retrying for up to a second
    /// while someone else holds it. `None` if it stayed taken.
    async fn hold_exclusive_queue(&self, queue: &str) -> Option<Channel> {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            let ch = self.conn.create_channel().await.unwrap();
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("classic")),
            );
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            if ch.queue_declare(queue.into(), options, args).await.is_ok() {
                return Some(ch);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Starts an agent in process.
    fn spawn(&self, config: AgentConfig) -> AgentHandle {
        self.agents.lock().unwrap().push(config.id.clone());
        guildhall_agent::spawn(config)
    }

    /// Starts an agent and waits until it consumes its stage queue.
    async fn start(&self, config: AgentConfig) -> AgentHandle {
        let queue = self.names.stage_queue(&config.stage);
        let agent = self.spawn(config);
        eventually(Duration::from_secs(10), "the agent to consume", || async {
            assert!(!agent.is_finished(), "the agent ended early");
            let consumers = self.probe(&queue).await.map(|(_, c)| c);
            (consumers == Some(1)).then_some(())
        })
        .await;
        agent
    }

    /// Ready messages and consumers of a queue (`None` if it does not exist).
    async fn probe(&self, queue: &str) -> Option<(u32, u32)> {
        guildhall_broker::topology::probe_queue(&self.conn, queue)
            .await
            .unwrap()
            .map(|p| (p.ready, p.consumers))
    }

    /// Publishes a task to `stage` as a producer would.
    async fn submit(&self, stage: &str, id: &str, payload: &[u8]) {
        let stage = self.stage(stage);
        declare_stage(&self.channel, &self.names, &stage)
            .await
            .unwrap();
        let id: TaskId = id.parse().unwrap();
        let props = TaskMeta::submission(id, now_ms(), Some(TRACE.into())).properties();
        self.publisher
            .publish(&self.names.tasks_exchange(), stage.as_str(), payload, props)
            .await
            .unwrap();
    }

    /// Takes one message from `queue`, waiting for it.
    async fn take(&self, queue: &str) -> BasicGetMessage {
        eventually(
            Duration::from_secs(15),
            &format!("a message on {queue}"),
            || async {
                // Get only once a message is ready: a get from a missing queue
                // closes the channel, and RabbitMQ 3.10 answers a get on a
                // quorum queue whose Raft member is still starting (another
                // client just declared it) with a connection error (`noproc`).
                let (ready, _) = self.probe(queue).await?;
                if ready == 0 {
                    return None;
                }
                self.channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                    .await
                    .ok()
                    .flatten()
            },
        )
        .await
    }

    /// Sends a command to one agent and waits for its reply.
    async fn command(&self, agent: &AgentId, command: Command) -> CommandReply {
        let ch = self.conn.create_channel().await.unwrap();
        let reply_queue = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut replies = ch
            .basic_consume(
                reply_queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let id = rand::random::<u64>();
        let message = CommandMessage {
            id,
            sent_at_ms: now_ms(),
            command,
        };
        let props = BasicProperties::default()
            .with_reply_to(reply_queue.name().clone())
            .with_correlation_id(format!("c-{id}").into());
        self.publisher
            .publish(
                &self.names.control_exchange(),
                &Names::control_key_agent(agent),
                &encode_command(&message).unwrap(),
                props,
            )
            .await
            .unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(10), replies.next())
            .await
            .expect("a reply within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(
            delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some(format!("c-{id}").as_str())
        );
        let _ = ch.close(200, "done".into()).await;
        let reply: CommandReply = decode_reply(&delivery.data).unwrap();
        assert_eq!(reply.id, id);
        assert_eq!(&reply.agent, agent);
        reply
    }

    /// Reads the events stream from the start.
    async fn events(&self) -> EventReader {
        let ch = self.conn.create_channel().await.unwrap();
        ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            h::STREAM_OFFSET.into(),
            AMQPValue::LongString(LongString::from("first")),
        );
        let consumer = ch
            .basic_consume(
                self.names.events_stream().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .unwrap();
        EventReader {
            _channel: ch,
            consumer,
            seen: Vec::new(),
            envelopes: Vec::new(),
        }
    }
}

/// Events read so far from the stream, with their senders.
struct EventReader {
    _channel: Channel,
    consumer: lapin::Consumer,
    seen: Vec<(AgentId, Event)>,
    /// Every envelope read: sender and sequence number, in stream order.
    envelopes: Vec<(AgentId, u64)>,
}

impl EventReader {
    /// Reads until `done` holds for the events of `agent`, returning them.
    async fn until(
        &mut self,
        agent: &AgentId,
        what: &str,
        done: impl Fn(&[Event]) -> bool,
    ) -> Vec<Event> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mine: Vec<Event> = self
                .seen
                .iter()
                .filter(|(sender, _)| sender == agent)
                .map(|(_, e)| e.clone())
                .collect();
            if done(&mine) {
                return mine;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let delivery = match tokio::time::timeout(left, self.consumer.next()).await {
                Ok(Some(delivery)) => delivery.unwrap(),
                _ => panic!("timed out waiting for {what}; events: {mine:#?}"),
            };
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
            let decoded = guildhall_proto::decode(&delivery.data).unwrap();
            let sender = decoded.envelope.sender.clone();
            self.envelopes.push((sender.clone(), decoded.envelope.seq));
            self.seen.extend(
                decoded
                    .envelope
                    .events
                    .into_iter()
                    .map(|e| (sender.clone(), e)),
            );
        }
    }
}

impl EventReader {
    /// Checks that `agent`'s envelopes arrived in sequence order, with
    /// nothing missing: each is the next number or a resend of one already
    /// seen (a batch whose confirm was lost). Returns the highest.
    fn assert_sequence(&self, agent: &AgentId) -> u64 {
        let seqs: Vec<u64> = self
            .envelopes
            .iter()
            .filter(|(sender, _)| sender == agent)
            .map(|(_, seq)| *seq)
            .collect();
        let mut last = 0;
        for &seq in &seqs {
            assert!(
                seq == last + 1 || seq <= last,
                "envelope {seq} after {last}: {seqs:?}"
            );
            last = last.max(seq);
        }
        last
    }
}

/// The kinds of the events about `task`, in order, with their attempts.
fn task_story(events: &[Event], task: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.task_id().is_some_and(|t| t.as_str() == task))
        .map(|e| match e {
            Event::TaskStarted(s) => format!("started#{}", s.attempt),
            Event::TaskSucceeded(s) => format!("succeeded#{}", s.attempt),
            Event::TaskFailed(f) => format!("failed#{}:{}", f.attempt, f.error_class),
            Event::TaskRetrying(r) => format!("retrying#{}", r.attempt),
            Event::TaskDeadLettered(d) => format!("dead#{}", d.attempt),
            Event::TaskAbandoned(a) => format!("abandoned#{}:{}", a.attempt, a.reason),
            other => other.kind().to_owned(),
        })
        .collect()
}

fn has(events: &[Event], kind: &str) -> bool {
    events.iter().any(|e| e.kind() == kind)
}

/// The `TaskAbandoned` events among `events`.
fn abandoned(events: &[Event]) -> Vec<TaskAbandoned> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::TaskAbandoned(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

/// Whether a `TaskStarted` for `task` says it was redelivered.
fn redelivered(events: &[Event], task: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::TaskStarted(s) if s.task_id.as_str() == task && s.redelivered))
}

/// A scratch directory of this test process, for workers' marker files.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gh-agent-{}-{name}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The exec command of a worker that hangs (sleeps `hang_s`) the first time
/// and echoes its input from then on (a marker file remembers).
fn hangs_once(marker: &std::path::Path, hang_s: u32) -> String {
    let m = marker.display();
    format!("if [ -e '{m}' ]; then cat; else touch '{m}'; sleep {hang_s}; cat; fi")
}

fn attempt_of(message: &BasicGetMessage) -> Option<u64> {
    header_u64(message.delivery.properties.headers().as_ref()?, h::ATTEMPT)
}

fn text_header(message: &BasicGetMessage, key: &str) -> Option<String> {
    header_str(message.delivery.properties.headers().as_ref()?, key)
}

fn message_id(message: &BasicGetMessage) -> String {
    message
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default()
}

fn exec(command: &str) -> WorkerSpec {
    WorkerSpec::Exec {
        command: command.into(),
    }
}

#[tokio::test]
async fn exec_worker_results_reach_the_next_stage_and_events_tell_the_story() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let agent = env
            .start(env.config("upper", Some("out"), exec("tr a-z A-Z")))
            .await;
        let id = agent.id().clone();
        for (task, payload) in [("T-1", "hello"), ("T-2", "world")] {
            env.submit("upper", task, payload.as_bytes()).await;
        }
        let out = env.names.stage_queue(&env.stage("out"));
        let mut results = Vec::new();
        for _ in 0..2 {
            let message = env.take(&out).await;
            assert_eq!(attempt_of(&message), Some(1));
            let trace = text_header(&message, h::TRACEPARENT).unwrap();
            assert_eq!(&trace[3..35], &TRACE[3..35], "the trace id is kept");
            assert_ne!(trace, TRACE, "each stage is a new span");
            results.push((message_id(&message), message.delivery.data.clone()));
        }
        results.sort();
        assert_eq!(
            results,
            [
                ("T-1".to_owned(), b"HELLO".to_vec()),
                ("T-2".to_owned(), b"WORLD".to_vec())
            ]
        );
        let seen = events
            .until(&id, "both tasks to succeed", |e| {
                task_story(e, "T-1").contains(&"succeeded#1".to_owned())
                    && task_story(e, "T-2").contains(&"succeeded#1".to_owned())
            })
            .await;
        assert_eq!(seen[0].kind(), "hello");
        assert_eq!(seen[1].kind(), "heartbeat");
        assert_eq!(task_story(&seen, "T-1"), ["started#1", "succeeded#1"]);
        let Some(Event::TaskSucceeded(done)) = seen
            .iter()
            .find(|e| matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str() == "T-1"))
        else {
            unreachable!()
        };
        assert_eq!(done.next, Some(env.stage("out")));
        assert!(done.submitted_at_ms.is_some());

        let exit = agent.stop_and_join().await.unwrap();
        assert_eq!(
            (exit.done, exit.failed, exit.reason.as_str()),
            (2, 0, "shutdown")
        );
        events
            .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
            .await;
    })
    .await;
}

#[tokio::test]
async fn http_worker_gets_the_task_headers_and_may_pick_the_next_stage() {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;

    type Seen = Arc<Mutex<Vec<HeaderMap>>>;
    async fn work(
        axum::extract::State(seen): axum::extract::State<Seen>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        seen.lock().unwrap().push(headers.clone());
        let mut reply = body.to_vec();
        reply.reverse();
        match &body[..] {
            b"to-special" => (
                StatusCode::OK,
                [("x-guildhall-next-stage", "special")],
                reply,
            )
                .into_response(),
            b"the-end" => {
                (StatusCode::OK, [("x-guildhall-next-stage", "-")], reply).into_response()
            }
            b"bad-input" => (
                StatusCode::UNPROCESSABLE_ENTITY,
                [("x-guildhall-error-class", "bad_field")],
                "field x is missing",
            )
                .into_response(),
            _ => (StatusCode::OK, reply).into_response(),
        }
    }

    with_namespace(|env| async move {
        let seen: Seen = Arc::default();
        let app = axum::Router::new()
            .route("/work", axum::routing::post(work))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let worker = WorkerSpec::Http {
            url: format!("http://{addr}/work"),
        };
        let mut events = env.events().await;
        let agent = env.start(env.config("web", Some("after"), worker)).await;
        let id = agent.id().clone();
        // A stage the worker names must exist (it is not one of the agent's).
        declare_stage(&env.channel, &env.names, &env.stage("special"))
            .await
            .unwrap();
        env.submit("web", "H-1", b"abc").await;
        env.submit("web", "H-2", b"to-special").await;
        env.submit("web", "H-3", b"the-end").await;
        env.submit("web", "H-4", b"bad-input").await;

        let after = env.take(&env.names.stage_queue(&env.stage("after"))).await;
        assert_eq!(
            (message_id(&after).as_str(), &after.delivery.data[..]),
            ("H-1", &b"cba"[..])
        );
        let special = env
            .take(&env.names.stage_queue(&env.stage("special")))
            .await;
        assert_eq!(message_id(&special), "H-2");
        let dead = env.take(&env.names.dead_queue(&env.stage("web"))).await;
        assert_eq!(message_id(&dead), "H-4");
        assert_eq!(
            text_header(&dead, h::ERROR_CLASS).as_deref(),
            Some("bad_field")
        );
        assert_eq!(
            text_header(&dead, h::LAST_ERROR).as_deref(),
            Some("HTTP 422: field x is missing")
        );

        let story = events
            .until(&id, "all four tasks settled", |e| {
                task_story(e, "H-3").contains(&"succeeded#1".to_owned())
                    && task_story(e, "H-4").contains(&"dead#1".to_owned())
            })
            .await;
        let ended = story.iter().any(|e| {
            matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str() == "H-3" && s.next.is_none())
        });
        assert!(ended, "H-3 ended the pipeline");

        let headers = seen.lock().unwrap().clone();
        let first = headers
            .iter()
            .find(|h| h["x-guildhall-task-id"] == "H-1")
            .expect("H-1 was posted");
        assert_eq!(first["x-guildhall-stage"], "web");
        assert_eq!(first["x-guildhall-attempt"], "1");
        assert_eq!(first["idempotency-key"], "H-1/web/1");
        assert_eq!(first["content-type"], "application/octet-stream");
        let trace = first["traceparent"].to_str().unwrap();
        assert_eq!(&trace[3..35], &TRACE[3..35]);

        agent.stop_and_join().await.unwrap();
        server.abort();
    })
    .await;
}

#[tokio::test]
async fn a_retryable_failure_is_retried_with_attempt_2_and_then_succeeds() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let mut config = env.config(
            "flaky",
            Some("done"),
            exec(r#"if [ "$GUILDHALL_ATTEMPT" = 1 ]; then echo 'not yet' >&2; exit 3; fi; printf '%s:' "$GUILDHALL_ATTEMPT"; cat"#),
        );
        config.retry = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let agent = env.start(config).await;
        let id = agent.id().clone();
        env.submit("flaky", "F-1", b"x").await;
        let done = env.take(&env.names.stage_queue(&env.stage("done"))).await;
        assert_eq!(message_id(&done), "F-1");
        assert_eq!(&done.delivery.data[..], b"2:x", "the worker saw attempt 2");
        assert_eq!(attempt_of(&done), Some(1), "attempt 1 at the next stage");
        let seen = events
            .until(&id, "the retried task to succeed", |e| {
                task_story(e, "F-1").contains(&"succeeded#2".to_owned())
            })
            .await;
        assert_eq!(
            task_story(&seen, "F-1"),
            ["started#1", "failed#1:exit_3", "retrying#1", "started#2", "succeeded#2"]
        );
        let retrying = seen.iter().find_map(|e| match e {
            Event::TaskRetrying(r) => Some(r.delay_ms),
            _ => None,
        });
        assert_eq!(retrying, Some(100));
        let failed = seen.iter().find_map(|e| match e {
            Event::TaskFailed(f) => Some((f.error.clone(), f.retryable)),
            _ => None,
        });
        assert_eq!(failed, Some(("not yet".to_owned(), true)));
        let exit = agent.stop_and_join().await.unwrap();
        assert_eq!((exit.done, exit.failed), (1, 1));
    })
    .await;
}

#[tokio::test]
async fn permanent_failures_and_invalid_ids_are_dead_lettered_with_the_error() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let agent = env
            .start(env.config(
                "strict",
                None,
                exec("echo 'checking' >&2; echo 'bad input: no name' >&2; exit 65"),
            ))
            .await;
        let id = agent.id().clone();
        env.submit("strict", "P-1", b"payload").await;
        let dead_queue = env.names.dead_queue(&env.stage("strict"));
        let dead = env.take(&dead_queue).await;
        assert_eq!(message_id(&dead), "P-1");
        assert_eq!(&dead.delivery.data[..], b"payload", "the original payload");
        assert_eq!(
            text_header(&dead, h::LAST_ERROR).as_deref(),
            Some("bad input: no name")
        );
        assert_eq!(
            text_header(&dead, h::ERROR_CLASS).as_deref(),
            Some("exit_65")
        );
        assert_eq!(text_header(&dead, h::DEAD_STAGE).as_deref(), Some("strict"));
        assert_eq!(text_header(&dead, h::DEAD_BY).as_deref(), Some(id.as_str()));
        let seen = events
            .until(&id, "the dead-letter event", |e| {
                has(e, "task_dead_lettered")
            })
            .await;
        assert_eq!(
            task_story(&seen, "P-1"),
            ["started#1", "failed#1:exit_65", "dead#1"]
        );

        // A message id that is not a valid task id cannot be processed at all.
        let props = BasicProperties::default().with_message_id("has space".into());
        env.publisher
            .publish(&env.names.tasks_exchange(), "strict", b"?", props)
            .await
            .unwrap();
        let invalid = env.take(&dead_queue).await;
        assert_eq!(message_id(&invalid), "has space");
        assert_eq!(
            text_header(&invalid, h::ERROR_CLASS).as_deref(),
            Some("invalid_message_id")
        );
        let seen = events
            .until(&id, "the rejection reported", |e| {
                e.iter()
                    .any(|e| matches!(e, Event::DeliveryRejected(r) if r.dead_lettered))
            })
            .await;
        let rejected = seen.iter().find_map(|e| match e {
            Event::DeliveryRejected(r) => Some(r.clone()),
            _ => None,
        });
        let rejected = rejected.unwrap();
        assert_eq!(rejected.stage.as_str(), "strict");
        assert_eq!(
            rejected.reason,
            guildhall_proto::RejectReason::InvalidMessageId
        );
        assert!(rejected.detail.contains("has space"), "{}", rejected.detail);
        let exit = agent.stop_and_join().await.unwrap();
        assert_eq!((exit.done, exit.failed), (0, 1));
        assert_eq!((exit.rejected, exit.links_lost), (1, 0));
    })
    .await;
}

/// Deliveries a producer got wrong: odd header types on a task (processed
/// like any task, with defaults), and an invalid `message_id` whose dead
/// letter the broker refuses (its dead-letter queue was deleted): rejected
/// without requeue, once, never looping, and the connection kept.
#[tokio::test]
async fn odd_deliveries_neither_loop_nor_break_the_connection() {
    use lapin::options::QueueDeleteOptions;
    use lapin::types::FieldArray;
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let agent = env
            .start(env.config("odd", Some("fine"), exec("cat")))
            .await;
        let id = agent.id().clone();
        // A task whose headers are all the wrong type, or huge.
        let mut headers = FieldTable::default();
        headers.insert(h::ATTEMPT.into(), AMQPValue::Double(2.5));
        headers.insert(
            h::SUBMITTED_AT.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
        );
        headers.insert(h::ENQUEUED_AT.into(), AMQPValue::LongLongInt(-1));
        headers.insert(
            h::TRACEPARENT.into(),
            AMQPValue::LongString("0".repeat(60_000).into()),
        );
        headers.insert("x-void".into(), AMQPValue::Void);
        let props = BasicProperties::default()
            .with_message_id("ODD-1".into())
            .with_timestamp(u64::MAX)
            .with_headers(headers);
        env.publisher
            .publish(&env.names.tasks_exchange(), "odd", b"odd", props)
            .await
            .unwrap();
        let fine = env.take(&env.names.stage_queue(&env.stage("fine"))).await;
        assert_eq!(message_id(&fine), "ODD-1");
        assert_eq!(attempt_of(&fine), Some(1));
        let tp = text_header(&fine, h::TRACEPARENT).unwrap_or_default();
        assert!(tp.len() < 100, "a trace of its own, not the 60 KB header");

        // Now nothing can be dead-lettered at this stage.
        env.channel
            .queue_delete(
                env.names.dead_queue(&env.stage("odd")).as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await
            .unwrap();
        let props = BasicProperties::default().with_message_id("not a task id".into());
        env.publisher
            .publish(&env.names.tasks_exchange(), "odd", b"?", props)
            .await
            .unwrap();
        env.submit("odd", "AFTER-1", b"after").await;
        let after = env.take(&env.names.stage_queue(&env.stage("fine"))).await;
        assert_eq!(message_id(&after), "AFTER-1");
        let seen = events
            .until(&id, "the rejection reported", |e| {
                has(e, "delivery_rejected")
                    && task_story(e, "AFTER-1").contains(&"succeeded#1".to_owned())
            })
            .await;
        let rejected: Vec<_> = seen
            .iter()
            .filter_map(|e| match e {
                Event::DeliveryRejected(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(!rejected[0].dead_lettered);
        let queue = env.names.stage_queue(&env.stage("odd"));
        assert_eq!(env.probe(&queue).await.map(|(ready, _)| ready), Some(0));
        let exit = agent.stop_and_join().await.unwrap();
        assert_eq!((exit.done, exit.rejected, exit.links_lost), (2, 1, 0));
        assert_eq!(
            exit.implausible_times, 1,
            "the timestamp (the header was -1: none)"
        );
    })
    .await;
}

#[tokio::test]
async fn a_task_that_always_fails_is_dead_lettered_after_max_attempts() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let mut config = env.config(
            "doomed",
            Some("never"),
            exec("echo 'still broken' >&2; exit 7"),
        );
        config.retry = RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(50),
        };
        let agent = env.start(config).await;
        let id = agent.id().clone();
        env.submit("doomed", "D-1", b"x").await;
        let dead = env.take(&env.names.dead_queue(&env.stage("doomed"))).await;
        assert_eq!(message_id(&dead), "D-1");
        assert_eq!(attempt_of(&dead), Some(2));
        assert_eq!(
            text_header(&dead, h::ERROR_CLASS).as_deref(),
            Some("exit_7")
        );
        let seen = events
            .until(&id, "the dead-letter event", |e| {
                has(e, "task_dead_lettered")
            })
            .await;
        assert_eq!(
            task_story(&seen, "D-1"),
            [
                "started#1",
                "failed#1:exit_7",
                "retrying#1",
                "started#2",
                "failed#2:exit_7",
                "dead#2"
            ]
        );
        assert_eq!(
            env.probe(&env.names.stage_queue(&env.stage("never"))).await,
            Some((0, 0))
        );
        agent.stop_and_join().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn pause_stops_consumption_resume_restarts_it_and_drain_stops_the_agent() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let spec: SimulateSpec = "median=1ms,spread=0".parse().unwrap();
        let agent = env
            .start(env.config("sim", Some("next"), WorkerSpec::Simulated(spec)))
            .await;
        let id = agent.id().clone();
        let queue = env.names.stage_queue(&env.stage("sim"));

        let reply = env.command(&id, Command::Pause).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(
            env.probe(&queue).await,
            Some((0, 0)),
            "no consumer while paused"
        );
        events
            .until(&id, "a paused heartbeat", |e| {
                e.iter()
                    .any(|e| matches!(e, Event::Heartbeat(h) if h.state == AgentState::Paused))
            })
            .await;
        for i in 0..3 {
            env.submit("sim", &format!("S-{i}"), b"x").await;
        }
        // Nothing consumes while paused: the tasks stay ready.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(env.probe(&queue).await, Some((3, 0)));

        let reply = env.command(&id, Command::Resume).await;
        assert!(reply.ok, "{reply:?}");
        let next = env.names.stage_queue(&env.stage("next"));
        eventually(
            Duration::from_secs(10),
            "3 results after resume",
            || async { (env.probe(&next).await == Some((3, 0))).then_some(()) },
        )
        .await;

        let reply = env
            .command(&id, Command::SetConcurrency { concurrency: 4 })
            .await;
        assert!(reply.ok, "{reply:?}");
        events
            .until(&id, "a heartbeat with concurrency 4", |e| {
                e.iter()
                    .any(|e| matches!(e, Event::Heartbeat(h) if h.concurrency == 4))
            })
            .await;
        assert!(
            !env.command(&id, Command::SetConcurrency { concurrency: 0 })
                .await
                .ok
        );
        let reply = env
            .command(
                &id,
                Command::Assign {
                    stage: env.stage("other"),
                    reason: "test".into(),
                },
            )
            .await;
        assert_eq!(
            (reply.ok, reply.message.as_str()),
            (false, "this agent cannot serve stage other (it serves sim)")
        );
        assert!(!env.command(&id, Command::Logs { lines: 10 }).await.ok);

        let reply = env.command(&id, Command::Drain).await;
        assert!(reply.ok, "{reply:?}");
        let exit = tokio::time::timeout(Duration::from_secs(10), agent.join())
            .await
            .expect("the agent stops after a drain")
            .unwrap();
        assert_eq!((exit.reason.as_str(), exit.done), ("drain", 3));
        let seen = events
            .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
            .await;
        let Some(Event::AgentStopping(stopping)) = seen.last() else {
            panic!("AgentStopping is the last event: {seen:#?}")
        };
        assert_eq!(stopping.reason, "drain");
    })
    .await;
}

#[tokio::test]
async fn a_stop_finishes_the_task_in_hand_and_leaves_the_rest_queued() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let agent = env
            .start(env.config("slow", Some("after"), exec("sleep 1; cat")))
            .await;
        let id = agent.id().clone();
        env.submit("slow", "L-1", b"one").await;
        events
            .until(&id, "the task to start", |e| has(e, "task_started"))
            .await;
        env.submit("slow", "L-2", b"two").await;
        agent.stop();
        let exit = agent.join().await.unwrap();
        assert_eq!((exit.done, exit.requeued), (1, 0));
        let after = env.take(&env.names.stage_queue(&env.stage("after"))).await;
        assert_eq!(
            (message_id(&after).as_str(), &after.delivery.data[..]),
            ("L-1", &b"one"[..])
        );
        let queue = env.names.stage_queue(&env.stage("slow"));
        assert_eq!(env.probe(&queue).await, Some((1, 0)), "L-2 stays queued");
        let seen = events
            .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
            .await;
        let kinds: Vec<&str> = seen
            .iter()
            .map(Event::kind)
            .filter(|k| *k != "heartbeat")
            .collect();
        assert_eq!(
            kinds,
            ["hello", "task_started", "task_succeeded", "agent_stopping"]
        );
    })
    .await;
}

#[tokio::test]
async fn a_stop_timeout_gives_the_task_back_to_the_queue() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let mut config = env.config("stuck", None, exec("sleep 30"));
        config.shutdown_timeout = Duration::from_millis(300);
        let agent = env.start(config).await;
        let id = agent.id().clone();
        env.submit("stuck", "K-1", b"x").await;
        events
            .until(&id, "the task to start", |e| has(e, "task_started"))
            .await;
        let started = Instant::now();
        let exit = agent.stop_and_join().await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!((exit.done, exit.requeued), (0, 1));
        let queue = env.names.stage_queue(&env.stage("stuck"));
        // The broker requeues asynchronously after the agent's nack.
        eventually(Duration::from_secs(5), "K-1 back in the queue", || async {
            (env.probe(&queue).await == Some((1, 0))).then_some(())
        })
        .await;
        let seen = events
            .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
            .await;
        assert_eq!(
            task_story(&seen, "K-1"),
            ["started#1", "abandoned#1:stop timeout"]
        );
    })
    .await;
}

#[tokio::test]
async fn a_supervised_worker_is_restarted_and_its_output_kept() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let spec: SimulateSpec = "median=1ms".parse().unwrap();
        let config = env
            .config("super", None, WorkerSpec::Simulated(spec))
            .with_supervised(vec![
                "sh".into(),
                "-c".into(),
                "echo worker up; sleep 0.3; echo giving up >&2; exit 3".into(),
            ]);
        let agent = env.spawn(config);
        let id = agent.id().clone();
        let seen = events
            .until(&id, "two worker exits", |e| {
                e.iter().filter(|e| e.kind() == "worker_exited").count() >= 2
            })
            .await;
        let exits: Vec<_> = seen
            .iter()
            .filter_map(|e| match e {
                Event::WorkerExited(w) => Some(w.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(exits[0].code, Some(3));
        assert_eq!(exits[0].restart_in_ms, Some(500));
        assert_eq!(exits[1].restarts, 1);
        assert_eq!(exits[1].restart_in_ms, Some(1000), "the backoff doubles");
        let Event::Hello(hello) = &seen[0] else {
            panic!("{seen:#?}")
        };
        assert!(hello.supervised);
        let reply = env.command(&id, Command::Logs { lines: 10 }).await;
        assert!(reply.ok);
        assert!(reply.lines.iter().any(|l| l == "worker up"), "{reply:?}");
        assert!(reply.lines.iter().any(|l| l == "giving up"), "{reply:?}");
        assert!(env.command(&id, Command::RestartWorker).await.ok);
        agent.stop_and_join().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn tasks_in_hand_go_back_to_the_queue_when_the_supervised_worker_exits() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let config = env
            .config("crashy", None, exec("sleep 10"))
            .with_supervised(vec!["sh".into(), "-c".into(), "sleep 1; exit 1".into()])
            .with_shutdown_timeout(Duration::from_millis(300));
        let agent = env.start(config).await;
        let id = agent.id().clone();
        env.submit("crashy", "C-1", b"x").await;
        let seen = events
            .until(
                &id,
                "the task to be redelivered after the worker exit",
                |e| {
                    e.iter()
                        .any(|e| matches!(e, Event::TaskStarted(s) if s.redelivered))
                },
            )
            .await;
        let kinds: Vec<&str> = seen
            .iter()
            .map(Event::kind)
            .filter(|k| *k != "heartbeat")
            .collect();
        assert_eq!(kinds[..2], ["hello", "task_started"]);
        // Both follow the exit; which one is published first is a race.
        let mut middle = kinds[2..4].to_vec();
        middle.sort();
        assert_eq!(middle, ["task_abandoned", "worker_exited"]);
        assert_eq!(kinds[4], "task_started");
        let gave_up = abandoned(&seen);
        assert_eq!(
            (gave_up[0].reason.as_str(), gave_up[0].result),
            ("worker exited", WorkerResult::Unfinished)
        );
        assert!(
            !seen.iter().any(|e| e.kind() == "task_failed"),
            "not a failure: the task was given back, not retried"
        );
        let exit = agent.stop_and_join().await.unwrap();
        assert!(exit.requeued >= 1, "{exit:?}");
        assert_eq!(exit.failed, 0);
    })
    .await;
}

#[tokio::test]
async fn the_binary_finishes_the_task_in_hand_on_sigterm() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let id: AgentId = format!("term-{:04x}", rand::random::<u16>())
            .parse()
            .unwrap();
        env.agents.lock().unwrap().push(id.clone());
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_guildhall-agent"))
            .args([
                "--stage",
                "term",
                "--next",
                "after",
                "--exec",
                "sleep 1; cat",
            ])
            .args([
                "--namespace",
                env.names.namespace().as_str(),
                "--id",
                id.as_str(),
            ])
            .args(["--heartbeat", "200ms", "--flush-interval", "10ms"])
            .env("AMQP_URL", amqp_url())
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let queue = env.names.stage_queue(&env.stage("term"));
        eventually(Duration::from_secs(10), "the binary to consume", || async {
            (env.probe(&queue).await.map(|(_, c)| c) == Some(1)).then_some(())
        })
        .await;
        env.submit("term", "G-1", b"graceful").await;
        events
            .until(&id, "the task to start", |e| has(e, "task_started"))
            .await;
        let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the binary exits after SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0));
        let after = env.take(&env.names.stage_queue(&env.stage("after"))).await;
        assert_eq!(&after.delivery.data[..], b"graceful");
        let seen = events
            .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
            .await;
        assert_eq!(
            task_story(&seen, "G-1"),
            ["started#1", "succeeded#1"],
            "the task finished before the exit"
        );
        let Some(Event::AgentStopping(stopping)) =
            seen.iter().find(|e| e.kind() == "agent_stopping")
        else {
            unreachable!()
        };
        assert_eq!(stopping.reason, "SIGTERM");
    })
    .await;
}

#[tokio::test]
async fn set_concurrency_keeps_the_tasks_in_hand() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let agent = env
            .start(env.config("wide", Some("out"), exec("sleep 0.5; cat")))
            .await;
        let id = agent.id().clone();
        for i in 0..4 {
            env.submit("wide", &format!("W-{i}"), b"x").await;
        }
        events
            .until(&id, "the first task to start", |e| has(e, "task_started"))
            .await;
        let reply = env
            .command(&id, Command::SetConcurrency { concurrency: 3 })
            .await;
        assert_eq!(
            (reply.ok, reply.message.as_str()),
            (true, "concurrency 1 -> 3, prefetch 1 -> 3")
        );
        let seen = events
            .until(&id, "all four tasks to succeed", |e| {
                e.iter().filter(|e| e.kind() == "task_succeeded").count() == 4
            })
            .await;
        let most_in_hand = seen
            .iter()
            .filter_map(|e| match e {
                Event::Heartbeat(h) => Some(h.in_hand.len()),
                _ => None,
            })
            .max();
        assert!(
            most_in_hand > Some(1),
            "tasks ran side by side: {most_in_hand:?}"
        );
        let redelivered = seen
            .iter()
            .any(|e| matches!(e, Event::TaskStarted(s) if s.redelivered));
        assert!(!redelivered, "no task was given back");
        let exit = agent.stop_and_join().await.unwrap();
        assert_eq!((exit.done, exit.requeued), (4, 0));
    })
    .await;
}

#[tokio::test]
async fn a_connection_closed_by_the_broker_gives_the_task_back_and_the_agent_reconnects() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let dir = scratch_dir("cut");
        let agent = env
            .start(env.config("cut", Some("after"), exec(&hangs_once(&dir.join("m"), 30))))
            .await;
        let id = agent.id().clone();
        env.wait_for_connection(&id).await;
        env.submit("cut", "R-1", b"once").await;
        events
            .until(&id, "the task to start", |e| has(e, "task_started"))
            .await;
        env.close_connection(&id).await;

        // Take the agent's command queue name as soon as the broker dropped
        // it with the old connection: reconnect attempts fail on it
        // (RESOURCE_LOCKED, retried) while events pile up in the agent.
        let control_queue = env.names.agent_control_queue(&id);
        let outage = match env.hold_exclusive_queue(&control_queue).await {
            Some(ch) => {
                let from_ms = now_ms();
                // The outage being simulated, not a wait for a condition.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                ch.queue_delete(control_queue.as_str().into(), Default::default())
                    .await
                    .unwrap();
                Some((from_ms, now_ms()))
            }
            None => None,
        };

        let seen = events
            .until(&id, "the redelivered task to succeed", |e| {
                task_story(e, "R-1").contains(&"succeeded#1".to_owned())
            })
            .await;
        assert_eq!(
            task_story(&seen, "R-1"),
            [
                "started#1",
                "abandoned#1:connection lost",
                "started#1",
                "succeeded#1"
            ]
        );
        assert!(redelivered(&seen, "R-1"));
        let gave_up = abandoned(&seen);
        assert_eq!(gave_up[0].result, WorkerResult::Unfinished);
        assert_eq!(
            seen.iter().filter(|e| e.kind() == "hello").count(),
            1,
            "Hello only at the start of the run"
        );

        // Handed on exactly once: the abandoned attempt published nothing.
        let after = env.names.stage_queue(&env.stage("after"));
        assert_eq!(env.probe(&after).await, Some((1, 0)));
        let message = env.take(&after).await;
        assert_eq!(
            (message_id(&message).as_str(), &message.delivery.data[..]),
            ("R-1", &b"once"[..])
        );

        // Heartbeats carry on after the reconnect, in sequence, and those
        // emitted while disconnected arrived too.
        let reconnected_at = gave_up[0].at_ms;
        let seen = events
            .until(&id, "heartbeats after the reconnect", |e| {
                e.iter()
                    .filter(|e| matches!(e, Event::Heartbeat(h) if h.at_ms > reconnected_at))
                    .count()
                    >= 3
            })
            .await;
        events.assert_sequence(&id);
        if let Some((from_ms, to_ms)) = outage {
            let during = seen
                .iter()
                .filter(|e| {
                    matches!(e, Event::Heartbeat(h) if h.at_ms > from_ms + 200 && h.at_ms < to_ms)
                })
                .count();
            assert!(
                during >= 3,
                "heartbeats from the {} ms outage: {during}",
                to_ms - from_ms
            );
        }

        let exit = agent.stop_and_join().await.unwrap();
        assert_eq!((exit.done, exit.requeued), (1, 1));
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test]
async fn a_frozen_agent_gives_up_the_task_its_worker_finished_and_carries_on() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let id: AgentId = format!("frozen-{:04x}", rand::random::<u16>())
            .parse()
            .unwrap();
        env.agents.lock().unwrap().push(id.clone());
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_guildhall-agent"))
            .args([
                "--stage",
                "frozen",
                "--next",
                "after",
                "--exec",
                "sleep 1; cat",
            ])
            .args([
                "--namespace",
                env.names.namespace().as_str(),
                "--id",
                id.as_str(),
            ])
            .args(["--heartbeat", "200ms", "--flush-interval", "10ms"])
            .env("AMQP_URL", amqp_url())
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let agent_pid = child.id().unwrap();
        let pid = rustix::process::Pid::from_raw(agent_pid as i32).unwrap();
        let queue = env.names.stage_queue(&env.stage("frozen"));
        eventually(Duration::from_secs(10), "the binary to consume", || async {
            (env.probe(&queue).await.map(|(_, c)| c) == Some(1)).then_some(())
        })
        .await;
        env.wait_for_connection(&id).await;
        env.submit("frozen", "Z-1", b"thawed").await;
        events
            .until(&id, "the task to start", |e| has(e, "task_started"))
            .await;

        // Freeze the agent (not its worker, which has a process group of
        // its own); the broker takes the task back from it.
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
        env.close_connection(&id).await;
        eventually(
            Duration::from_secs(10),
            "the task to be requeued",
            || async { (env.probe(&queue).await == Some((1, 0))).then_some(()) },
        )
        .await;
        eventually(
            Duration::from_secs(10),
            "the worker to finish while the agent is frozen",
            || async { children_all_exited(agent_pid) },
        )
        .await;
        rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();

        let seen = events
            .until(&id, "the task to be done again", |e| {
                task_story(e, "Z-1").contains(&"succeeded#1".to_owned())
            })
            .await;
        assert_eq!(
            task_story(&seen, "Z-1"),
            [
                "started#1",
                "abandoned#1:connection lost",
                "started#1",
                "succeeded#1"
            ]
        );
        assert_eq!(
            abandoned(&seen)[0].result,
            WorkerResult::Succeeded,
            "the worker had finished; its result was discarded"
        );
        let after = env.names.stage_queue(&env.stage("after"));
        assert_eq!(env.probe(&after).await, Some((1, 0)), "handed on once");
        events.assert_sequence(&id);

        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the binary exits after SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0));
    })
    .await;
}

/// `Some` once `pid` has children and all of them have exited (zombies its
/// parent has not reaped: it is stopped).
fn children_all_exited(pid: u32) -> Option<()> {
    let mut children = 0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after it.
        let mut fields = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if ppid == Some(pid.to_string().as_str()) {
            children += 1;
            if state != Some("Z") {
                return None;
            }
        }
    }
    (children > 0).then_some(())
}

#[tokio::test]
async fn events_published_through_an_outage_reach_the_stream_in_order() {
    with_namespace(|env| async move {
        let mut reader = env.events().await;
        let url = guildhall_broker::AmqpUrl::parse(&amqp_url()).unwrap();
        let sender: AgentId = format!("outage-{:04x}", rand::random::<u16>())
            .parse()
            .unwrap();
        let marker = |n: u64| Event::Marker(Marker { at_ms: n, nonce: n });
        let first = connect(&url, "guildhall-agent-tests/events").await.unwrap();
        let (events, _task) = EventPublisher::spawn(
            Publisher::open(&first).await.unwrap(),
            env.names.events_stream(),
            sender.clone(),
            EventPublisherConfig {
                flush_interval: Duration::from_millis(10),
                max_batch: 2,
                ..EventPublisherConfig::default()
            },
        );
        events.emit(marker(1));
        events.emit_confirmed(marker(2)).await.unwrap();

        first.close(200, "outage".into()).await.unwrap();
        for n in 3..=6 {
            events.emit(marker(n));
        }
        let started = Instant::now();
        let refused = events.emit_confirmed(marker(7)).await;
        assert!(refused.is_err(), "{refused:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the waiter is told promptly"
        );
        assert_eq!(events.stats().pending.load(Ordering::Relaxed), 5);

        let second = connect(&url, "guildhall-agent-tests/events").await.unwrap();
        events
            .reconnected(Publisher::open(&second).await.unwrap())
            .await;
        events.emit_confirmed(marker(8)).await.unwrap();
        let seen = reader
            .until(&sender, "all eight events", |e| e.len() >= 8)
            .await;
        let order: Vec<u64> = seen
            .iter()
            .map(|e| match e {
                Event::Marker(m) => m.nonce,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(order, (1..=8).collect::<Vec<_>>());
        assert_eq!(reader.assert_sequence(&sender), 5, "batches of two");
        assert_eq!(events.stats().dropped.load(Ordering::Relaxed), 0);
        let _ = second.close(200, "done".into()).await;
    })
    .await;
}

/// A worker for `python3 -c`: serves `/health`, and POSTs by echoing the
/// body, except the first POST ever (a marker file remembers), which hangs
/// the whole single-threaded server.
const HANGING_HTTP_WORKER: &str = r#"
import http.server, os, sys, time
port, marker = int(sys.argv[1]), sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def reply(self, body):
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply(b"ok")
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(3600)
        self.reply(body)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;

#[tokio::test]
async fn a_supervised_worker_that_stops_answering_its_health_url_is_restarted() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let dir = scratch_dir("health");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let worker = WorkerSpec::Http {
            url: format!("http://127.0.0.1:{port}/work"),
        };
        let config = env
            .config("sick", Some("after"), worker)
            .with_task_timeout(Duration::from_secs(60))
            .with_supervised(vec![
                "python3".into(),
                "-c".into(),
                HANGING_HTTP_WORKER.into(),
                port.to_string(),
                dir.join("m").display().to_string(),
            ])
            // Three failures in a row, so that a slow answer on a busy
            // machine is not taken for a hang.
            .with_health_check(
                format!("http://127.0.0.1:{port}/health"),
                Duration::from_millis(300),
                3,
            );
        let agent = env.start(config).await;
        let id = agent.id().clone();
        env.submit("sick", "U-1", b"healed").await;
        let seen = events
            .until(&id, "the task to succeed after the restart", |e| {
                task_story(e, "U-1").contains(&"succeeded#1".to_owned())
            })
            .await;
        assert_eq!(
            task_story(&seen, "U-1"),
            [
                "started#1",
                "abandoned#1:worker unhealthy",
                "started#1",
                "succeeded#1"
            ]
        );
        assert!(redelivered(&seen, "U-1"));
        let exit = seen
            .iter()
            .find_map(|e| match e {
                Event::WorkerExited(w) => Some(w.clone()),
                _ => None,
            })
            .expect("WorkerExited");
        assert_eq!(exit.signal, Some(15), "{exit:?}");
        assert!(exit.restart_in_ms.is_some());
        let after = env.take(&env.names.stage_queue(&env.stage("after"))).await;
        assert_eq!(&after.delivery.data[..], b"healed");
        let exit = agent.stop_and_join().await.unwrap();
        assert_eq!((exit.done, exit.failed, exit.requeued), (1, 0, 1));
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test]
async fn a_task_timeout_on_a_supervised_worker_restarts_it_instead_of_retrying() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let dir = scratch_dir("hung");
        let config = env
            .config("hung", None, exec(&hangs_once(&dir.join("m"), 30)))
            .with_task_timeout(Duration::from_secs(1))
            .with_supervised(vec!["sleep".into(), "3600".into()]);
        let agent = env.start(config).await;
        let id = agent.id().clone();
        env.submit("hung", "T-1", b"x").await;
        let seen = events
            .until(&id, "the task to succeed after the restart", |e| {
                task_story(e, "T-1").contains(&"succeeded#1".to_owned())
            })
            .await;
        assert_eq!(
            task_story(&seen, "T-1"),
            [
                "started#1",
                "abandoned#1:worker hung: task timeout",
                "started#1",
                "succeeded#1"
            ],
            "given back, not retried through the retry queue"
        );
        assert!(has(&seen, "worker_exited"));
        let exit = agent.stop_and_join().await.unwrap();
        assert_eq!((exit.done, exit.failed, exit.requeued), (1, 0, 1));
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test]
async fn a_declaration_refused_after_a_reconnect_ends_the_run() {
    with_namespace(|env| async move {
        let agent = env.start(env.config("fa", Some("fb"), exec("cat"))).await;
        let id = agent.id().clone();
        env.wait_for_connection(&id).await;
        // Replace the next stage's queue with one of other arguments: no
        // retry can make the agent's declaration of it succeed.
        let queue = env.names.stage_queue(&env.stage("fb"));
        guildhall_broker::topology::delete_queue(&env.conn, &queue)
            .await
            .unwrap();
        let ch = env.conn.create_channel().await.unwrap();
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        env.close_connection(&id).await;
        let err = tokio::time::timeout(Duration::from_secs(20), agent.join())
            .await
            .expect("the run ends instead of retrying")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retrying cannot help"), "{err}");
        assert!(err.contains("PRECONDITION"), "{err}");
        assert!(err.contains(&queue), "{err}");
    })
    .await;
}

/// Tasks of `stage` started and not yet settled, from one agent's events.
fn stage_in_hand(events: &[Event], stage: &str) -> usize {
    let (mut started, mut settled) = (0usize, 0usize);
    for event in events {
        match event {
            Event::TaskStarted(e) if e.stage.as_str() == stage => started += 1,
            Event::TaskSucceeded(e) if e.stage.as_str() == stage => settled += 1,
            Event::TaskFailed(e) if e.stage.as_str() == stage => settled += 1,
            Event::TaskAbandoned(e) if e.stage.as_str() == stage => settled += 1,
            _ => {}
        }
    }
    started.saturating_sub(settled)
}

impl TestEnv {
    /// Takes the `n` messages waiting on `queue` (a sink nobody else
    /// consumes) and returns their message ids.
    async fn drain_ids(&self, queue: &str, n: usize) -> Vec<String> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .unwrap_or_else(|_| panic!("{} of {n} messages on {queue}", ids.len()))
                .unwrap()
                .unwrap();
            let id = delivery.properties.message_id().as_ref().unwrap();
            ids.push(id.as_str().to_owned());
        }
        let _ = ch.close(200, "drained".into()).await;
        ids
    }
}

#[tokio::test]
async fn an_agent_moved_between_stages_under_load_loses_and_repeats_no_task() {
    const PER_STAGE: usize = 300;
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let spec: SimulateSpec = "median=100ms,spread=0".parse().unwrap();
        let routes = guildhall_agent::config::parse_stages("x>xout,y>yout").unwrap();
        // Heartbeats far apart: one right after a switch is the agent's own.
        let config = env
            .config("x", None, WorkerSpec::Simulated(spec.clone()))
            .with_stages(routes)
            .with_concurrency(8)
            .with_heartbeat(Duration::from_secs(5));
        let flexible = env.start(config).await;
        let f = flexible.id().clone();
        let (qx, qy) = (
            env.names.stage_queue(&env.stage("x")),
            env.names.stage_queue(&env.stage("y")),
        );
        let assign = |stage: &str, reason: &str| Command::Assign {
            stage: env.stage(stage),
            reason: reason.into(),
        };

        let reply = env.command(&f, assign("z", "not mine")).await;
        assert_eq!(
            (reply.ok, reply.message.as_str()),
            (false, "this agent cannot serve stage z (it serves x, y)")
        );
        let reply = env.command(&f, assign("x", "no-op")).await;
        assert_eq!((reply.ok, reply.message.as_str()), (true, "already serving x"));
        for bad in [0, 10_001] {
            let reply = env.command(&f, Command::SetPrefetch { prefetch: bad }).await;
            assert_eq!(
                (reply.ok, reply.message),
                (false, format!("prefetch must be between 1 and 10000 (got {bad})"))
            );
        }
        // Deliveries beyond the concurrency wait in the agent; each switch
        // gives them back to the queue.
        let reply = env.command(&f, Command::SetPrefetch { prefetch: 16 }).await;
        assert_eq!((reply.ok, reply.message.as_str()), (true, "prefetch 8 -> 16"));

        // A paused agent switches too, and stays paused.
        assert!(env.command(&f, Command::Pause).await.ok);
        let reply = env.command(&f, assign("y", "while paused")).await;
        assert_eq!(
            (reply.ok, reply.message.as_str()),
            (
                true,
                "serving y (was x); 0 task(s) in hand will finish as tasks of their stage"
            )
        );
        assert_eq!(env.probe(&qx).await.map(|p| p.1), Some(0));
        assert_eq!(env.probe(&qy).await.map(|p| p.1), Some(0), "still paused");
        events
            .until(&f, "a paused heartbeat serving y", |e| {
                e.iter().any(|e| {
                    matches!(e, Event::Heartbeat(h) if h.state == AgentState::Paused && h.stage.as_str() == "y")
                })
            })
            .await;
        assert!(env.command(&f, assign("x", "back before the load")).await.ok);
        assert!(env.command(&f, Command::Resume).await.ok);
        eventually(Duration::from_secs(10), "x consumed again", || async {
            (env.probe(&qx).await.map(|p| p.1) == Some(1)).then_some(())
        })
        .await;

        // A steady stream to both stages, faster than the agent alone can take
        // it (80 tasks/s on one stage at a time): each switch finds tasks in
        // hand and deliveries waiting in the agent. It lasts (~3.6 s) beyond
        // the seven moves (~2.5 s): with 150 tasks a stage it ended first,
        // and a late move could find the stage it left already drained
        // (about 1 run in 3).
        let url = guildhall_broker::AmqpUrl::parse(&amqp_url()).unwrap();
        let names = env.names.clone();
        let submitter = tokio::spawn(async move {
            let conn = connect(&url, "guildhall-agent-tests/submitter")
                .await
                .unwrap();
            let publisher = Publisher::open(&conn).await.unwrap();
            for i in 0..PER_STAGE {
                for (stage, prefix) in [("x", "X"), ("y", "Y")] {
                    let id: TaskId = format!("{prefix}-{i}").parse().unwrap();
                    let props = TaskMeta::submission(id, now_ms(), None).properties();
                    publisher
                        .publish(&names.tasks_exchange(), stage, b"t", props)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(6)).await;
                }
            }
            let _ = conn.close(200, "submitted".into()).await;
        });

        // Moves back and forth, each while the agent holds tasks of the
        // stage it leaves (a few, so that some are still at the worker when
        // the command arrives).
        let moves = ["y", "x", "y", "x", "y", "x", "y"];
        let mut in_hand_at_move = Vec::new();
        let mut current = "x";
        let mut expected_moves = vec![
            ("x".to_owned(), "y".to_owned(), "while paused".to_owned()),
            ("y".into(), "x".into(), "back before the load".into()),
        ];
        for (i, to) in moves.into_iter().enumerate() {
            events
                .until(&f, &format!("tasks of {current} in hand"), |e| {
                    stage_in_hand(e, current) >= 3
                })
                .await;
            let reason = format!("move {}: {current} -> {to}", i + 1);
            let reply = env.command(&f, assign(to, &reason)).await;
            assert!(reply.ok, "{reply:?}");
            let prefix = format!("serving {to} (was {current}); ");
            assert!(reply.message.starts_with(&prefix), "{reply:?}");
            // What the agent held at the switch (the events the test reads
            // lag behind it: on a loaded machine the tasks seen in hand may
            // have finished by the time the command arrives).
            let held: usize = reply.message[prefix.len()..]
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no task count in {reply:?}"));
            in_hand_at_move.push(held);
            expected_moves.push((current.into(), to.into(), reason));
            current = to;
            // The dwell time, as the coordinator would keep it.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        submitter.await.unwrap();
        // An ordinary agent finishes x while the flexible one serves y.
        let plain = env
            .start(
                env.config("x", Some("xout"), WorkerSpec::Simulated(spec))
                    .with_concurrency(8),
            )
            .await;
        let g = plain.id().clone();
        let (xout, yout) = (
            env.names.stage_queue(&env.stage("xout")),
            env.names.stage_queue(&env.stage("yout")),
        );
        let per_stage = PER_STAGE as u32;
        eventually(Duration::from_secs(20), "every result", || async {
            let done = (env.probe(&xout).await?.0, env.probe(&yout).await?.0);
            (done == (per_stage, per_stage)).then_some(())
        })
        .await;

        // After a reconnect the agent consumes the stage it serves now.
        env.close_connection(&f).await;
        env.submit("y", "Y-after", b"t").await;
        eventually(Duration::from_secs(15), "Y-after handed on", || async {
            (env.probe(&yout).await?.0 == per_stage + 1).then_some(())
        })
        .await;

        plain.stop_and_join().await.unwrap();
        let exit = flexible.stop_and_join().await.unwrap();
        assert_eq!(exit.requeued, 0, "{exit:?}");
        assert_eq!(env.probe(&xout).await, Some((per_stage, 0)), "nothing more");
        assert_eq!(
            env.probe(&yout).await,
            Some((per_stage + 1, 0)),
            "nothing more"
        );

        // Every task reached its stage's sink exactly once.
        for (queue, prefix, extra) in [(&xout, "X", None), (&yout, "Y", Some("Y-after"))] {
            let mut expected: Vec<String> =
                (0..PER_STAGE).map(|i| format!("{prefix}-{i}")).collect();
            expected.extend(extra.map(str::to_owned));
            expected.sort();
            let mut ids = env.drain_ids(queue, expected.len()).await;
            ids.sort();
            assert_eq!(ids, expected, "{queue}");
        }

        let fe = events
            .until(&f, "the flexible agent to stop", |e| has(e, "agent_stopping"))
            .await;
        let ge = events
            .until(&g, "the plain agent to stop", |e| has(e, "agent_stopping"))
            .await;
        let Event::Hello(hello) = &fe[0] else {
            panic!("{:?}", fe[0])
        };
        let listed: Vec<&str> = hello.stages.iter().map(|s| s.as_str()).collect();
        assert_eq!(listed, ["x", "y"]);
        assert_eq!(
            (hello.stage.as_str(), hello.next.as_ref().map(|n| n.as_str())),
            ("x", Some("xout"))
        );

        // No task ran twice, none was given up, each was reported under
        // its own stage with its own next stage.
        let all: Vec<&Event> = fe.iter().chain(&ge).collect();
        assert!(!all.iter().any(|e| matches!(e, Event::TaskAbandoned(_) | Event::TaskFailed(_))));
        for (stage, prefix) in [("x", "X"), ("y", "Y")] {
            for i in 0..PER_STAGE {
                let id = format!("{prefix}-{i}");
                let mine = |e: &&&Event| e.task_id().is_some_and(|t| t.as_str() == id);
                let started: Vec<_> = all
                    .iter()
                    .filter(mine)
                    .filter_map(|e| match e {
                        Event::TaskStarted(s) => Some(s),
                        _ => None,
                    })
                    .collect();
                assert_eq!(started.len(), 1, "{id} started once: {started:?}");
                assert_eq!(started[0].stage.as_str(), stage);
                let succeeded: Vec<_> = all
                    .iter()
                    .filter(mine)
                    .filter_map(|e| match e {
                        Event::TaskSucceeded(s) => Some(s),
                        _ => None,
                    })
                    .collect();
                assert_eq!(succeeded.len(), 1, "{id} succeeded once");
                assert_eq!(succeeded[0].stage.as_str(), stage);
                assert_eq!(
                    succeeded[0].next.as_ref().map(|n| n.as_str()),
                    Some(format!("{stage}out").as_str())
                );
            }
        }

        // The moves, in order, with their reasons.
        let moved: Vec<(usize, &guildhall_proto::Reassigned)> = fe
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Event::Reassigned(r) => Some((i, r)),
                _ => None,
            })
            .collect();
        let seen_moves: Vec<(String, String, String)> = moved
            .iter()
            .map(|(_, r)| (r.from.to_string(), r.to.to_string(), r.reason.clone()))
            .collect();
        assert_eq!(seen_moves, expected_moves);
        let mut held_at_switch = Vec::new();
        for (n, (at, r)) in moved.iter().enumerate() {
            let end = moved.get(n + 1).map_or(fe.len(), |(i, _)| *i);
            let window = &fe[at + 1..end];
            let (from, to) = (r.from.as_str(), r.to.as_str());
            let next_of = |s: &str| Some(format!("{s}out"));
            // A heartbeat at once, naming the new stage; none stamped after
            // the switch names the old one.
            let beats: Vec<_> = window
                .iter()
                .filter_map(|e| match e {
                    Event::Heartbeat(h) => Some(h),
                    _ => None,
                })
                .collect();
            assert!(
                beats.iter().any(|h| h.stage.as_str() == to
                    && h.next.as_ref().map(|s| s.to_string()) == next_of(to)),
                "a heartbeat serving {to} after {r:?}: {beats:?}"
            );
            for h in &beats {
                assert!(h.at_ms <= r.at_ms || h.stage.as_str() == to, "{h:?} after {r:?}");
                assert!(h.in_hand.len() <= 8, "the concurrency spans both stages: {h:?}");
            }
            if n < 2 {
                continue; // the moves before the load
            }
            // Tasks in hand at the switch (started before it in the agent's
            // own event order, not finished before it) finish after it, as
            // tasks of the stage they came from. Which ones those are is
            // read from the events: the count in the command's reply was
            // taken a moment before the switch, and a task can finish in
            // between (on a loaded machine, all of them).
            let before = &fe[..*at];
            let held: std::collections::BTreeSet<&str> = before
                .iter()
                .filter_map(|e| match e {
                    Event::TaskStarted(t) if t.stage.as_str() == from => Some(t.task_id.as_str()),
                    _ => None,
                })
                .filter(|id| {
                    !before.iter().any(|e| {
                        matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str() == *id && s.stage.as_str() == from)
                    })
                })
                .collect();
            for id in &held {
                let finished_old = fe[at + 1..].iter().any(|e| {
                    matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str() == *id
                        && s.stage.as_str() == from
                        && s.next.as_ref().map(|n| n.to_string()) == next_of(from)
                        && s.started_at_ms <= r.at_ms)
                });
                assert!(finished_old, "{id}, a task of {from} in hand at {r:?}, finished after it as a task of {from}");
            }
            held_at_switch.push(held.len());
        }
        assert!(
            held_at_switch.iter().filter(|&&n| n > 0).count() >= 3,
            "most moves under load find tasks in hand: {held_at_switch:?} (the agent's own counts: {in_hand_at_move:?})"
        );
        let rtt = fe.iter().rev().find_map(|e| match e {
            Event::Heartbeat(h) => h.rtt_ms,
            _ => None,
        });
        assert!(rtt.is_some_and(|ms| (1..10_000).contains(&ms)), "{rtt:?}");
    })
    .await;
}

#[tokio::test]
async fn set_prefetch_lets_the_agent_hold_more_tasks_than_its_concurrency() {
    with_namespace(|env| async move {
        let mut events = env.events().await;
        let config = env
            .config("pf", None, exec("sleep 30"))
            .with_shutdown_timeout(Duration::from_millis(300));
        let agent = env.start(config).await;
        let id = agent.id().clone();
        let queue = env.names.stage_queue(&env.stage("pf"));
        for i in 0..30 {
            env.submit("pf", &format!("P-{i}"), b"x").await;
        }
        // Ready messages are the rest: exact and immediate, unlike the
        // management API's unacked counts. (The consumer count is not: a
        // quorum queue counts a cancelled consumer until its messages are
        // settled.)
        let held = |ready: u32| {
            let (env, queue) = (&env, &queue);
            async move {
                eventually(
                    Duration::from_secs(10),
                    &format!("{} tasks held by the agent", 30 - ready),
                    || async { (env.probe(queue).await?.0 == ready).then_some(()) },
                )
                .await
            }
        };
        held(29).await;
        // A last stage publishes no task: a probe measures the round trip.
        events
            .until(&id, "a heartbeat with the broker round trip", |e| {
                e.iter().any(
                    |e| matches!(e, Event::Heartbeat(h) if h.rtt_ms.is_some_and(|ms| ms < 10_000)),
                )
            })
            .await;
        for bad in [0, 10_001] {
            let reply = env
                .command(&id, Command::SetPrefetch { prefetch: bad })
                .await;
            assert!(!reply.ok, "{reply:?}");
        }
        let reply = env
            .command(&id, Command::SetPrefetch { prefetch: 20 })
            .await;
        assert_eq!(
            (reply.ok, reply.message.as_str()),
            (true, "prefetch 1 -> 20")
        );
        // The new consumer holds 20 (its prefetch), the task in hand came
        // through the one it replaced.
        held(9).await;
        let seen = events
            .until(&id, "the first task to start", |e| has(e, "task_started"))
            .await;
        let started = seen.iter().filter(|e| e.kind() == "task_started").count();
        assert_eq!(started, 1, "20 held, one at the worker (concurrency 1)");

        let reply = env
            .command(&id, Command::SetConcurrency { concurrency: 25 })
            .await;
        assert_eq!(
            (reply.ok, reply.message.as_str()),
            (true, "concurrency 1 -> 25, prefetch 20 -> 25")
        );
        // The 20 waiting went back; the new consumer took 25.
        held(4).await;
        let reply = env.command(&id, Command::SetPrefetch { prefetch: 3 }).await;
        assert_eq!(
            (reply.ok, reply.message.as_str()),
            (
                true,
                "prefetch 25 -> 25 (3 asked, never below the concurrency)"
            )
        );
        let reply = env
            .command(&id, Command::SetConcurrency { concurrency: 20 })
            .await;
        assert_eq!(
            (reply.ok, reply.message.as_str()),
            (true, "concurrency 25 -> 20, prefetch 25 -> 20")
        );
        let exit = agent.stop_and_join().await.unwrap();
        assert_eq!(exit.done, 0);
        let seen = events
            .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
            .await;
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, Event::TaskAbandoned(a) if a.reason != "stop timeout")),
            "only the stop gave tasks back"
        );
        // The broker requeues a closed channel's deliveries and drops its
        // consumers on its own time, a moment after the agent has gone.
        eventually(Duration::from_secs(10), "all back in the queue", || async {
            (env.probe(&queue).await == Some((30, 0))).then_some(())
        })
        .await;
    })
    .await;
}
