//! The agent against the real RabbitMQ, one module per theme: what happens
//! to tasks ([`tasks`]), commands ([`commands`]), stopping ([`stop`]), the
//! supervised worker ([`supervised`]), lost connections ([`reconnect`]),
//! moves between stages ([`assign`]), and the binary's command line
//! ([`cli`]: bad flags and an unreachable broker, no broker needed).
//!
//! Most tests run the agent in process ([`start_agent`]) to read its exit
//! counters; those about the binary's signals run the real one
//! ([`guildhall_tests::spawn_agent`] with [`FAST_BEATS`]). Connection losses
//! are caused the way they happen in production: the broker closes the
//! agent's connection (through the management API, as the coordinator does
//! for a frozen agent). The broker itself is never restarted here: other
//! tests share it.

mod assign;
mod cli;
mod commands;
mod reconnect;
mod stop;
mod supervised;
mod tasks;

use guildhall_broker::task::{header_str, header_u64};
use guildhall_proto::AgentId;
use guildhall_proto::headers::amqp as h;
use guildhall_tests::{Agent, Broker, EventReader, TestNs, eventually, spawn_agent};
use lapin::message::BasicGetMessage;
use std::time::Duration;

/// The `traceparent` every task is submitted with.
const TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// Flags of a real agent binary for heartbeats and event flushes as fast as
/// the in-process agents' ([`guildhall_tests::inproc::agent_config`]).
const FAST_BEATS: [&str; 4] = ["--heartbeat", "200ms", "--flush-interval", "10ms"];

/// A namespace of its own, a broker connection, and a reader of the events
/// stream from its start (declared here, before any agent).
async fn setup() -> (TestNs, Broker, EventReader) {
    let ns = TestNs::new("agent");
    let broker = Broker::connect(&ns).await.expect("connect to the broker");
    broker
        .ensure_events_stream()
        .await
        .expect("declare the events stream");
    let events = broker.events().await.expect("read the events stream");
    (ns, broker, events)
}

/// Starts the real agent binary serving `stage`, each task taking a second
/// (`sleep 1; cat`), results to stage `after`; returns it once it consumes.
async fn start_binary(ns: &TestNs, broker: &Broker, stage: &str) -> (Agent, AgentId) {
    let id = format!("{stage}-{:04x}", rand::random::<u16>());
    let mut extra = vec!["--next", "after", "--exec", "sleep 1; cat"];
    extra.extend(FAST_BEATS);
    let agent = spawn_agent(ns, &id, stage, &extra)
        .await
        .expect("start the agent binary");
    let queue = broker.names.stage_queue(&TestNs::stage(stage));
    eventually(Duration::from_secs(10), "the binary to consume", || async {
        let got = broker.probe(&queue).await;
        anyhow::ensure!(got.map(|(_, c)| c) == Some(1), "{got:?}");
        Ok(())
    })
    .await;
    (agent, id.parse().expect("a valid agent id"))
}

/// Sends the agent binary SIGTERM; it must exit with status 0 within 10 s.
async fn terminate_cleanly(agent: &mut Agent) {
    let status = agent
        .proc
        .terminate(Duration::from_secs(10))
        .await
        .expect("the binary exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
}

/// Publishes a task to `stage` (declared first) as a traced producer would.
async fn submit(broker: &Broker, stage: &str, id: &str, payload: &[u8]) {
    broker.declare_stage(stage).await.expect("declare a stage");
    broker
        .publish_traced(stage, id, payload, Some(TRACE))
        .await
        .expect("publish a task");
}

/// The exec command of a worker that hangs (sleeps `hang_s`) the first time
/// and echoes its input from then on (a marker file remembers).
fn hangs_once(marker: &std::path::Path, hang_s: u32) -> String {
    let m = marker.display();
    format!("if [ -e '{m}' ]; then cat; else touch '{m}'; sleep {hang_s}; cat; fi")
}

/// A message's `x-guildhall-attempt` header.
fn attempt_of(message: &BasicGetMessage) -> Option<u64> {
    header_u64(message.delivery.properties.headers().as_ref()?, h::ATTEMPT)
}

/// A message's text header `key`.
fn text_header(message: &BasicGetMessage, key: &str) -> Option<String> {
    header_str(message.delivery.properties.headers().as_ref()?, key)
}

/// A message's `message_id` (empty if it has none).
fn message_id(message: &BasicGetMessage) -> String {
    message
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default()
}
