//! What happens to a task: handed on with its trace, retried, dead-lettered
//! with its error, routed where an HTTP worker says; deliveries that cannot
//! be tasks.

use super::{TRACE, attempt_of, message_id, setup, submit, text_header};
use guildhall_agent::{RetryPolicy, WorkerSpec};
use guildhall_proto::Event;
use guildhall_proto::headers::amqp as h;
use guildhall_tests::TestNs;
use guildhall_tests::events::{has, task_story};
use guildhall_tests::inproc::{agent_config, exec, start_agent};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test]
async fn exec_worker_results_reach_the_next_stage_and_events_tell_the_story() {
    let (ns, broker, mut events) = setup().await;
    let agent = start_agent(
        &broker,
        agent_config(&ns, "upper", Some("out"), exec("tr a-z A-Z")),
    )
    .await;
    let id = agent.id().clone();
    for (task, payload) in [("T-1", "hello"), ("T-2", "world")] {
        submit(&broker, "upper", task, payload.as_bytes()).await;
    }
    let out = broker.names.stage_queue(&TestNs::stage("out"));
    let mut results = Vec::new();
    for _ in 0..2 {
        let message = broker.take(&out).await;
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
    assert_eq!(done.next, Some(TestNs::stage("out")));
    assert!(done.submitted_at_ms.is_some());

    let exit = agent.stop_and_join().await.unwrap();
    assert_eq!(
        (exit.done, exit.failed, exit.reason.as_str()),
        (2, 0, "shutdown")
    );
    events
        .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
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

    let (ns, broker, mut events) = setup().await;
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
    let agent = start_agent(&broker, agent_config(&ns, "web", Some("after"), worker)).await;
    let id = agent.id().clone();
    // A stage the worker names must exist (it is not one of the agent's).
    broker.declare_stage("special").await.unwrap();
    submit(&broker, "web", "H-1", b"abc").await;
    submit(&broker, "web", "H-2", b"to-special").await;
    submit(&broker, "web", "H-3", b"the-end").await;
    submit(&broker, "web", "H-4", b"bad-input").await;

    let after = broker
        .take(&broker.names.stage_queue(&TestNs::stage("after")))
        .await;
    assert_eq!(
        (message_id(&after).as_str(), &after.delivery.data[..]),
        ("H-1", &b"cba"[..])
    );
    let special = broker
        .take(&broker.names.stage_queue(&TestNs::stage("special")))
        .await;
    assert_eq!(message_id(&special), "H-2");
    let dead = broker
        .take(&broker.names.dead_queue(&TestNs::stage("web")))
        .await;
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
    let ended = story.iter().any(
        |e| matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str() == "H-3" && s.next.is_none()),
    );
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
}

#[tokio::test]
async fn a_retryable_failure_is_retried_with_attempt_2_and_then_succeeds() {
    let (ns, broker, mut events) = setup().await;
    let mut config = agent_config(
        &ns,
        "flaky",
        Some("done"),
        exec(
            r#"if [ "$GUILDHALL_ATTEMPT" = 1 ]; then echo 'not yet' >&2; exit 3; fi; printf '%s:' "$GUILDHALL_ATTEMPT"; cat"#,
        ),
    );
    config.retry = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
    };
    let agent = start_agent(&broker, config).await;
    let id = agent.id().clone();
    submit(&broker, "flaky", "F-1", b"x").await;
    let done = broker
        .take(&broker.names.stage_queue(&TestNs::stage("done")))
        .await;
    assert_eq!(message_id(&done), "F-1");
    assert_eq!(&done.delivery.data[..], b"2:x", "the worker saw attempt 2");
    assert_eq!(attempt_of(&done), Some(1), "attempt 1 at the next stage");
    let seen = events.until_step(&id, "F-1", "succeeded#2").await;
    assert_eq!(
        task_story(&seen, "F-1"),
        [
            "started#1",
            "failed#1:exit_3",
            "retrying#1",
            "started#2",
            "succeeded#2"
        ]
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
}

#[tokio::test]
async fn permanent_failures_and_invalid_ids_are_dead_lettered_with_the_error() {
    let (ns, broker, mut events) = setup().await;
    let agent = start_agent(
        &broker,
        agent_config(
            &ns,
            "strict",
            None,
            exec("echo 'checking' >&2; echo 'bad input: no name' >&2; exit 65"),
        ),
    )
    .await;
    let id = agent.id().clone();
    submit(&broker, "strict", "P-1", b"payload").await;
    let dead_queue = broker.names.dead_queue(&TestNs::stage("strict"));
    let dead = broker.take(&dead_queue).await;
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
    broker
        .publisher
        .publish(&broker.names.tasks_exchange(), "strict", b"?", props)
        .await
        .unwrap();
    let invalid = broker.take(&dead_queue).await;
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
}

/// Deliveries a producer got wrong: odd header types on a task (processed
/// like any task, with defaults), and an invalid `message_id` whose dead
/// letter the broker refuses (its dead-letter queue was deleted): rejected
/// without requeue, once, never looping, and the connection kept.
#[tokio::test]
async fn odd_deliveries_neither_loop_nor_break_the_connection() {
    use lapin::options::QueueDeleteOptions;
    use lapin::types::FieldArray;
    let (ns, broker, mut events) = setup().await;
    let agent = start_agent(&broker, agent_config(&ns, "odd", Some("fine"), exec("cat"))).await;
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
    broker
        .publisher
        .publish(&broker.names.tasks_exchange(), "odd", b"odd", props)
        .await
        .unwrap();
    let fine = broker
        .take(&broker.names.stage_queue(&TestNs::stage("fine")))
        .await;
    assert_eq!(message_id(&fine), "ODD-1");
    assert_eq!(attempt_of(&fine), Some(1));
    let tp = text_header(&fine, h::TRACEPARENT).unwrap_or_default();
    assert!(tp.len() < 100, "a trace of its own, not the 60 KB header");

    // Now nothing can be dead-lettered at this stage.
    broker
        .channel
        .queue_delete(
            broker
                .names
                .dead_queue(&TestNs::stage("odd"))
                .as_str()
                .into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let props = BasicProperties::default().with_message_id("not a task id".into());
    broker
        .publisher
        .publish(&broker.names.tasks_exchange(), "odd", b"?", props)
        .await
        .unwrap();
    submit(&broker, "odd", "AFTER-1", b"after").await;
    let after = broker
        .take(&broker.names.stage_queue(&TestNs::stage("fine")))
        .await;
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
    let queue = broker.names.stage_queue(&TestNs::stage("odd"));
    assert_eq!(broker.probe(&queue).await.map(|(ready, _)| ready), Some(0));
    let exit = agent.stop_and_join().await.unwrap();
    assert_eq!((exit.done, exit.rejected, exit.links_lost), (2, 1, 0));
    assert_eq!(
        exit.implausible_times, 1,
        "the timestamp (the header was -1: none)"
    );
}

#[tokio::test]
async fn a_task_that_always_fails_is_dead_lettered_after_max_attempts() {
    let (ns, broker, mut events) = setup().await;
    let mut config = agent_config(
        &ns,
        "doomed",
        Some("never"),
        exec("echo 'still broken' >&2; exit 7"),
    );
    config.retry = RetryPolicy {
        max_attempts: 2,
        base_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(50),
    };
    let agent = start_agent(&broker, config).await;
    let id = agent.id().clone();
    submit(&broker, "doomed", "D-1", b"x").await;
    let dead = broker
        .take(&broker.names.dead_queue(&TestNs::stage("doomed")))
        .await;
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
        broker
            .probe(&broker.names.stage_queue(&TestNs::stage("never")))
            .await,
        Some((0, 0))
    );
    agent.stop_and_join().await.unwrap();
}
