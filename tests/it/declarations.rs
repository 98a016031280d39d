//! Declarations that fit a cluster (issue 20): every quorum queue and
//! stream a namespace uses is created with its replication size and
//! balanced leader placement; a namespace an older Guildhall declared
//! without them still declares; a queue of other arguments is still
//! refused, naming the queue.

use guildhall_broker::topology::{self, REPLICAS, StreamRetention};
use guildhall_tests::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;

/// The arguments the broker keeps for `queue` (management API).
async fn arguments(queue: &str) -> Value {
    let response = management()
        .request(reqwest::Method::GET, &["queues", "/", queue])
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "GET queue {queue}");
    let info: Value = response.json().await.unwrap();
    info["arguments"].clone()
}

#[tokio::test]
async fn every_quorum_queue_and_stream_is_created_with_replicas_and_balanced_leaders() {
    let ns = TestNs::new("declare");
    let broker = Broker::connect(&ns).await.unwrap();
    let stage = TestNs::stage("work");
    broker.declare_stage("work").await.unwrap();
    broker.ensure_events_stream().await.unwrap();
    topology::ensure_results_stream(&broker.conn, &ns.names, &StreamRetention::default())
        .await
        .unwrap();
    topology::declare_delay_ladder(&broker.conn, &ns.names)
        .await
        .unwrap();
    topology::declare_retry_queue(&broker.conn, &ns.names, &stage, 5_000)
        .await
        .unwrap();
    // Declaring everything again is no error.
    broker.declare_stage("work").await.unwrap();
    topology::declare_delay_ladder(&broker.conn, &ns.names)
        .await
        .unwrap();

    let queues = management()
        .queues_with_prefix(&format!("{}.", ns.name()))
        .await
        .unwrap();
    // The stage, its dead queue, its bands, 23 ladder levels, a retry
    // queue and the two streams.
    assert!(queues.len() >= 28, "{} queues", queues.len());
    let (mut quorum, mut streams) = (0, 0);
    for q in &queues {
        let args = arguments(&q.name).await;
        assert_eq!(
            args["x-queue-leader-locator"], "balanced",
            "{}: {args}",
            q.name
        );
        match args["x-queue-type"].as_str() {
            Some("quorum") => {
                quorum += 1;
                assert_eq!(args["x-quorum-initial-group-size"], REPLICAS, "{}", q.name);
            }
            Some("stream") => {
                streams += 1;
                assert_eq!(args["x-initial-cluster-size"], REPLICAS, "{}", q.name);
            }
            other => panic!("{}: queue type {other:?}", q.name),
        }
    }
    assert_eq!(streams, 2, "the events and results streams");
    assert!(quorum >= 26, "{quorum} quorum queues");
}

/// The arguments an older Guildhall declared a stage's queue with (no
/// placement).
fn old_stage_arguments(ns: &TestNs, stage: &str) -> FieldTable {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), text("quorum"));
    t.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(topology::DELIVERY_LIMIT),
    );
    t.insert(
        "x-dead-letter-exchange".into(),
        text(&ns.names.dead_exchange()),
    );
    t.insert("x-dead-letter-routing-key".into(), text(stage));
    t.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    t.insert("x-overflow".into(), text("reject-publish"));
    t
}

async fn declare_raw(broker: &Broker, queue: &str, table: FieldTable) {
    let ch = broker.conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        table,
    )
    .await
    .unwrap();
    let _ = ch.close(200, "declared".into()).await;
}

#[tokio::test]
async fn a_namespace_an_older_guildhall_declared_still_declares_and_runs() {
    let ns = TestNs::new("declare-old");
    let broker = Broker::connect(&ns).await.unwrap();
    let queue = ns.names.stage_queue(&TestNs::stage("work"));
    declare_raw(&broker, &queue, old_stage_arguments(&ns, "work")).await;

    broker.declare_stage("work").await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let args = arguments(&queue).await;
    assert!(
        args.get("x-queue-leader-locator").is_none(),
        "the existing queue is used as it is: {args}"
    );
    // The rest of the stage was created now, with placement.
    let dead = arguments(&ns.names.dead_queue(&TestNs::stage("work"))).await;
    assert_eq!(dead["x-queue-leader-locator"], "balanced", "{dead}");
    // And the stage works: a task published reaches the queue.
    broker.publish_task("work", "old-1", "x").await.unwrap();
    assert_eq!(broker.probe(&queue).await.map(|(ready, _)| ready), Some(1));
}

#[tokio::test]
async fn a_queue_of_other_arguments_is_refused_naming_it() {
    let ns = TestNs::new("declare-other");
    let broker = Broker::connect(&ns).await.unwrap();
    let queue = ns.names.stage_queue(&TestNs::stage("work"));
    // A classic queue under the stage queue's name.
    declare_raw(&broker, &queue, FieldTable::default()).await;
    let err = topology::declare_stage(&broker.conn, &ns.names, &TestNs::stage("work"))
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains(&queue), "{text}");
    assert!(text.contains("PRECONDITION"), "{text}");
    // The connection is still usable: only the channel was closed.
    broker.declare_stage("other").await.unwrap();
}
