//! Delays on the real broker: a third-party producer's `x-delay` (ms)
//! holds a task in the delay ladder and it starts within a second of its
//! due time; a bad `x-delay` is dead-lettered with the reason.

use guildhall_broker::now_ms;
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{AgentId, Event};
use guildhall_tests::events::EventReader;
use guildhall_tests::rig::{Rig, header, publish_plain, reasons};
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
    let rig = Rig::start(&ns, &[], &[]).await;
    let broker = &rig.broker;
    let mut events = rig.events().await;
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
        publish_plain(broker, "work", id, "x", props).await;
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
    let rig = Rig::start(&ns, &[], &[]).await;
    let (broker, worker) = (&rig.broker, &rig.worker);
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
        publish_plain(broker, "work", id, "x", props).await;
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

/// The ladder is quorum queues: a delay survives a broker crash (SIGKILL
/// and a start on the same data) and still fires on time. On a private
/// node (needs root, as the TLS test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_survives_a_broker_restart_and_fires_on_time() {
    use guildhall_broker::{AmqpUrl, connect};
    use guildhall_tests::node::spawn_plain_rabbitmq_node;
    let ns = TestNs::new("delay-restart");
    let mut node = spawn_plain_rabbitmq_node(&ns, "delay").await.unwrap();
    let url = node.amqp_url();
    let conn = connect(&AmqpUrl::parse(&url).unwrap(), "delay-test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    guildhall_broker::topology::declare_stage(&conn, &ns.names, &TestNs::stage("work"))
        .await
        .unwrap();
    guildhall_broker::topology::ensure_events_stream(
        &conn,
        &ns.names,
        &guildhall_broker::topology::StreamRetention::default(),
    )
    .await
    .unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let _agent = spawn_agent(
        &ns,
        "work-1",
        "work",
        &["--worker-url", &worker.url, "--amqp-url", &url],
    )
    .await
    .unwrap();
    let delay_ms = 40_000u64;
    let t0 = now_ms();
    ch.basic_publish(
        ns.names.tasks_exchange().as_str().into(),
        "work".into(),
        Default::default(),
        b"x",
        BasicProperties::default()
            .with_message_id("R-1".into())
            .with_delivery_mode(2)
            .with_headers(header(h::DELAY, AMQPValue::LongLongInt(delay_ms as i64))),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let due = t0 + delay_ms;
    // Sorted into the ladder (not merely off the intake: unacked in the
    // agent's sorter it would be requeued by the crash), then the crash.
    let intake = ns.names.stage_queue(&TestNs::stage("work"));
    eventually(
        Duration::from_secs(10),
        "the task in the ladder",
        || async {
            let p = guildhall_broker::topology::probe_queue(&conn, &intake).await?;
            anyhow::ensure!(p.map(|p| p.ready) == Some(0), "{p:?}");
            let n = guildhall_tests::ladder_ready(&conn, &ns.names).await?;
            anyhow::ensure!(n == 1, "{n} in the ladder");
            Ok(())
        },
    )
    .await;
    // Not for the ladder: the node's stream coordinator starts with the
    // events stream, and RabbitMQ 3.10 SIGKILLed within a second or so of
    // that does not bring the stream back ("home node ... is down or
    // inaccessible" after the restart, even once the stream was read from).
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(ch);
    let _ = conn.close(200, "restart".into()).await;
    node.restart().await.unwrap();
    let restarted = now_ms();
    assert!(restarted < due, "the node took too long to restart");
    let conn = connect(&AmqpUrl::parse(&url).unwrap(), "delay-test-2")
        .await
        .unwrap();
    // A stream is readable a little after its node is back.
    let mut events = eventually(Duration::from_secs(30), "the events stream", || {
        EventReader::open(&conn, &ns.names)
    })
    .await;
    let agent = AgentId::new("work-1").unwrap();
    // The reader waits 15 s at most: start it shortly before the due time.
    tokio::time::sleep(Duration::from_millis(due.saturating_sub(now_ms() + 5_000))).await;
    let deadline = Duration::from_millis(due.saturating_sub(now_ms()) + 15_000);
    let seen = tokio::time::timeout(
        deadline,
        events.until(&agent, "R-1 started", |e| started_at(e, "R-1").is_some()),
    )
    .await
    .expect("R-1 never started after the restart");
    let late = started_at(&seen, "R-1").unwrap() as i64 - due as i64;
    assert!(
        (-500..1_000).contains(&late),
        "R-1 started {late} ms after its due time"
    );
}

/// A retry of a second or more goes through the delay ladder straight back
/// to the task's band (no retry queue of its own delay), on time, with its
/// priority.
#[tokio::test]
async fn a_retry_waits_in_the_ladder_and_comes_back_to_its_band() {
    let ns = TestNs::new("delay-retry");
    let rig = Rig::start(&ns, &[], &["--retry-delay", "2s"]).await;
    let broker = &rig.broker;
    let mut events = rig.events().await;
    let agent = AgentId::new("work-1").unwrap();
    publish_plain(
        broker,
        "work",
        "RT-1",
        "fail=once",
        BasicProperties::default().with_priority(7),
    )
    .await;
    let seen = events.until_step(&agent, "RT-1", "succeeded#2").await;
    let failed_at = seen
        .iter()
        .find_map(|e| match e {
            Event::TaskFailed(f) if f.task_id.as_str() == "RT-1" => Some(f.at_ms),
            _ => None,
        })
        .unwrap();
    let second = seen
        .iter()
        .find_map(|e| match e {
            Event::TaskStarted(s) if s.task_id.as_str() == "RT-1" && s.attempt == 2 => {
                Some(s.at_ms)
            }
            _ => None,
        })
        .unwrap();
    let waited = second as i64 - failed_at as i64;
    assert!(
        (1_500..3_000).contains(&waited),
        "the retry waited {waited} ms"
    );
    let retry_queue = ns.names.retry_queue(&TestNs::stage("work"), 2_000);
    assert_eq!(
        broker.probe(&retry_queue).await,
        None,
        "no retry queue of its own"
    );
}

/// The ladder's entry exchange deleted under a running agent: the first
/// delayed move is refused (404, the broker closes the mover's publish
/// channel). The mover opens its channels again and declares the ladder
/// again, so the task waits out its delay and starts: it is neither lost
/// nor dead-lettered (the intake's delivery limit is not spent on a
/// publisher that can no longer publish).
#[tokio::test]
async fn a_delayed_task_survives_the_ladder_entry_deleted_under_the_agent() {
    use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
    let ns = TestNs::new("delay-gone");
    let rig = Rig::start(&ns, &[], &[]).await;
    let broker = &rig.broker;
    let mut events = rig.events().await;
    let agent = AgentId::new("work-1").unwrap();
    let intake = broker.names.stage_queue(&TestNs::stage("work"));
    // The mover declares the ladder, then consumes the intake.
    eventually(
        Duration::from_secs(20),
        "the intake mover consuming",
        || async {
            let probed = guildhall_broker::topology::probe_queue(&broker.conn, &intake).await?;
            let consumers = probed.map_or(0, |p| p.consumers);
            anyhow::ensure!(consumers >= 1, "{consumers} intake consumers");
            Ok(())
        },
    )
    .await;
    let entry = broker.names.delay_entry();
    let ch = broker.conn.create_channel().await.unwrap();
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare(
        entry.as_str().into(),
        lapin::ExchangeKind::Topic,
        passive,
        FieldTable::default(),
    )
    .await
    .expect("the agent declared the ladder");
    ch.exchange_delete(entry.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let _ = ch.close(200, "deleted".into()).await;
    let props =
        BasicProperties::default().with_headers(header(h::DELAY, AMQPValue::LongLongInt(1_000)));
    publish_plain(broker, "work", "GONE-1", "x", props).await;
    let seen = events
        .until(&agent, "the delayed task started", |e| {
            started_at(e, "GONE-1").is_some()
        })
        .await;
    assert!(started_at(&seen, "GONE-1").is_some());
    let dead = broker.names.dead_queue(&TestNs::stage("work"));
    assert_eq!(broker.probe(&dead).await.map(|(ready, _)| ready), Some(0));
}
