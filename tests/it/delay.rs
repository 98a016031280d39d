//! Delays on the real broker: a third-party producer's `x-delay` (ms)
//! holds a task in the delay ladder and it starts within a second of its
//! due time; a bad `x-delay` is dead-lettered with the reason.

use crate::priority::{header, publish_plain, reasons};
use guildhall_broker::now_ms;
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{AgentId, Event};
use guildhall_tests::Broker;
use guildhall_tests::events::EventReader;
use guildhall_tests::{TestNs, eventually, spawn_agent, spawn_http_worker};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::time::Duration;

fn started_at(events: &[Event], id: &str) -> Option<u64> {
    events.iter().find_map(|e| match e {
        Event::TaskStarted(s) if s.task_id.as_str() == id => Some(s.at_ms),
        _ => None,
    })
}

#[tokio::test]
async fn a_delayed_task_starts_within_a_second_of_its_due_time() {
    let ns = TestNs::new("delay");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.ensure_events_stream().await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let mut events = EventReader::open(&broker.conn, &broker.names)
        .await
        .unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let _agent = spawn_agent(&ns, "work-1", "work", &["--worker-url", &worker.url])
        .await
        .unwrap();
    let agent = AgentId::new("work-1").unwrap();
    // Each form a producer may use: an integer, decimal text, a priority.
    let delays: [(&str, u64, AMQPValue, Option<u8>); 3] = [
        ("D-3", 3_000, AMQPValue::LongLongInt(3_000), None),
        (
            "D-5",
            5_000,
            AMQPValue::LongString(LongString::from("5000")),
            Some(8),
        ),
        ("D-2", 2_000, AMQPValue::LongInt(2_000), None),
    ];
    let mut due = Vec::new();
    for (id, ms, value, priority) in delays {
        let mut props = BasicProperties::default().with_headers(header(h::DELAY, value));
        if let Some(p) = priority {
            props = props.with_priority(p);
        }
        let t0 = now_ms();
        publish_plain(&broker, "work", id, "x", props).await;
        due.push((id, t0 + ms));
    }
    let seen = events
        .until(&agent, "every delayed task started", |e| {
            due.iter().all(|(id, _)| started_at(e, id).is_some())
        })
        .await;
    for (id, due_at) in &due {
        let started = started_at(&seen, id).unwrap();
        let late = started as i64 - *due_at as i64;
        assert!(
            (-500..1_000).contains(&late),
            "{id} started {late} ms after its due time"
        );
    }
    // Each was reported as scheduled, with its due time.
    for (id, due_at) in &due {
        let queued = seen.iter().find_map(|e| match e {
            Event::TaskQueued(q) if q.task_id.as_str() == *id => Some(q.clone()),
            _ => None,
        });
        let queued = queued.unwrap_or_else(|| panic!("no TaskQueued for {id}"));
        let reported = queued.due_at_ms.unwrap();
        // Counted from when the agent sorted it off the intake.
        assert!(
            reported.abs_diff(*due_at) < 1_000,
            "{id}: {reported} vs {due_at}"
        );
    }
}

#[tokio::test]
async fn a_bad_x_delay_is_dead_lettered_with_the_reason() {
    let ns = TestNs::new("delay-bad");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.ensure_events_stream().await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let _agent = spawn_agent(&ns, "work-1", "work", &["--worker-url", &worker.url])
        .await
        .unwrap();
    let bad: [(&str, AMQPValue, &str); 5] = [
        (
            "X-text",
            AMQPValue::LongString(LongString::from("soon")),
            "not a number",
        ),
        ("X-neg", AMQPValue::LongLongInt(-5), "negative"),
        (
            "X-neg-text",
            AMQPValue::LongString(LongString::from("-100")),
            "negative",
        ),
        ("X-long", AMQPValue::LongLongInt(i64::MAX), "longest"),
        (
            "X-table",
            AMQPValue::FieldTable(FieldTable::default()),
            "table",
        ),
    ];
    for (id, value, _) in &bad {
        let props = BasicProperties::default().with_headers(header(h::DELAY, value.clone()));
        publish_plain(&broker, "work", id, "x", props).await;
    }
    let dead = broker.names.dead_queue(&TestNs::stage("work"));
    let letters = eventually(Duration::from_secs(20), "five dead letters", || async {
        let (ready, _) = broker.probe(&dead).await.unwrap_or((0, 0));
        anyhow::ensure!(ready >= 5, "{ready} dead letters");
        broker.drain(&dead).await
    })
    .await;
    assert_eq!(letters.len(), 5);
    for (id, _, why) in bad {
        let (_, _, headers) = letters.iter().find(|(i, _, _)| i == id).unwrap();
        let (class, error) = reasons(headers);
        assert_eq!(class, "invalid_delay", "{id}");
        assert!(error.contains(why), "{id}: {error}");
    }
    assert!(worker.calls().await.unwrap().is_empty());
}
