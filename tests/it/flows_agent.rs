//! Flows (issue 19), the agent's part, on the real broker with the real
//! agent binary and the test worker: an HTTP worker's fan-out publishes its
//! children (ids `<parent>:<i>`, the parent header, the parent's priority)
//! before the events that report it, 10,000 of them too; a child whose
//! pipeline ends reports its result; an exec worker fans out too; a hostile fan-out is
//! dead-lettered (`invalid_fan_out`) with nothing published; a third-party
//! message with `x-guildhall-after` is held (`TaskHeld`), a malformed one
//! dead-lettered (`invalid_after`).

use guildhall_broker::task::header_str;
use guildhall_proto::flow::{ChildPolicy, DependencyPolicy};
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{AgentId, Band, Event, RejectReason};
use guildhall_tests::rig::{Rig, header, publish_plain, reasons};
use guildhall_tests::{Broker, TestNs, eventually, exec_worker_command, spawn_agent};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, LongString};
use std::time::Duration;

fn agent(id: &str) -> AgentId {
    AgentId::new(id).unwrap()
}

/// The events about `parent` and its children, as `kind id` (heartbeats,
/// starts, the intake's `TaskQueued` and others' events left out).
fn fan_story(events: &[Event], parent: &str) -> Vec<String> {
    let child = format!("{parent}:");
    events
        .iter()
        .filter(|e| !matches!(e.kind(), "task_started" | "task_queued"))
        .filter_map(|e| {
            let id = e.task_id()?.as_str();
            (id == parent || id.starts_with(&child)).then(|| format!("{} {id}", e.kind()))
        })
        .collect()
}

/// Every message now in `stage`'s intake and bands, sorted by id:
/// (id, payload, parent header, priority).
async fn children_at(
    broker: &Broker,
    stage: &str,
    n: usize,
) -> Vec<(String, String, Option<String>, Option<u8>)> {
    let queue = broker.names.stage_queue(&TestNs::stage(stage));
    let mut got = Vec::new();
    for _ in 0..n {
        let m = broker.take(&queue).await;
        let props = &m.delivery.properties;
        let headers = props.headers().clone().unwrap_or_default();
        got.push((
            props
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            header_str(&headers, h::PARENT),
            *props.priority(),
        ));
    }
    got.sort();
    got
}

#[tokio::test]
async fn an_http_worker_fans_out_children_before_the_events_that_report_them() {
    let ns = TestNs::new("fan-http");
    let rig = Rig::start(&ns, &["kid", "merge"], &["--next", "kid"]).await;
    let mut events = rig.events().await;
    publish_plain(
        &rig.broker,
        "work",
        "P-1",
        "fanout=5 fanstage=kid join=merge onchild=continue child:hello",
        BasicProperties::default().with_priority(7),
    )
    .await;
    let children = children_at(&rig.broker, "kid", 5).await;
    let want: Vec<_> = (0..5)
        .map(|i| {
            (
                format!("P-1:{i}"),
                format!("hello n={i}"),
                Some("P-1".to_owned()),
                Some(7),
            )
        })
        .collect();
    assert_eq!(children, want);
    // In the parent's band: the high one.
    let high = rig
        .broker
        .names
        .band_queue(&TestNs::stage("kid"), Band::High);
    assert_eq!(rig.broker.probe(&high).await, Some((0, 0)), "all taken");
    let seen = events
        .until(&agent("work-1"), "the parent's success", |e| {
            fan_story(e, "P-1").contains(&"task_succeeded P-1".to_owned())
        })
        .await;
    let mut want: Vec<String> = (0..5).map(|i| format!("task_submitted P-1:{i}")).collect();
    want.extend(["task_fanned_out P-1".into(), "task_succeeded P-1".into()]);
    assert_eq!(fan_story(&seen, "P-1"), want);
    let fanned = seen
        .iter()
        .find_map(|e| match e {
            Event::TaskFannedOut(f) => Some(f.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (fanned.stage.as_str(), fanned.attempt, fanned.children),
        ("work", 1, 5)
    );
    assert_eq!(fanned.join, Some(TestNs::stage("merge")));
    assert_eq!(fanned.on_child_failure, ChildPolicy::Continue);
    assert_eq!(fanned.priority.get(), 7);
    for e in &seen {
        match e {
            Event::TaskSucceeded(s) if s.task_id.as_str() == "P-1" => assert_eq!(s.next, None),
            Event::TaskSubmitted(s) => assert_eq!(s.stage.as_str(), "kid"),
            _ => {}
        }
    }
    // The worker was called once, for the parent; the join got nothing.
    let calls = rig.worker.calls().await.unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let merge = rig.broker.names.stage_queue(&TestNs::stage("merge"));
    assert_eq!(rig.broker.probe(&merge).await, Some((0, 0)));
}

#[tokio::test]
async fn a_child_at_its_pipeline_end_reports_its_result() {
    let ns = TestNs::new("fan-result");
    let rig = Rig::start(&ns, &["kid"], &["--next", "kid"]).await;
    let kid = spawn_agent(
        &ns,
        "kid-1",
        "kid",
        &["--worker-url", rig.worker.url.as_str()],
    )
    .await
    .unwrap();
    let mut events = rig.events().await;
    rig.broker
        .publish_task("work", "P-2", "fanout=3 join=- child:hi")
        .await
        .unwrap();
    let seen = events
        .until(&agent(&kid.id), "three results", |e| {
            e.iter().filter(|e| e.kind() == "task_succeeded").count() == 3
        })
        .await;
    for i in 0..3 {
        let id = format!("P-2:{i}");
        let story: Vec<&str> = seen
            .iter()
            .filter(|e| e.task_id().is_some_and(|t| t.as_str() == id))
            .map(Event::kind)
            .collect();
        assert_eq!(
            story,
            ["task_started", "task_result", "task_succeeded"],
            "{id}"
        );
        let result = seen
            .iter()
            .find_map(|e| match e {
                Event::TaskResult(r) if r.task_id.as_str() == id => Some(r.clone()),
                _ => None,
            })
            .unwrap();
        let want = format!("hi n={i} @kid");
        assert_eq!(result.parent.as_str(), "P-2");
        assert_eq!((result.stage.as_str(), result.attempt), ("kid", 1));
        assert_eq!(result.result.as_deref(), Some(want.as_bytes()));
        assert_eq!(result.result_bytes, want.len() as u64);
    }
    // The parent fanned out without a join; it reported no result itself.
    let parent = events
        .until(&agent("work-1"), "the parent's fan-out", |e| {
            e.iter().any(|e| e.kind() == "task_fanned_out")
        })
        .await;
    assert!(!parent.iter().any(|e| e.kind() == "task_result"));
    let Some(Event::TaskFannedOut(f)) = parent.iter().find(|e| e.kind() == "task_fanned_out")
    else {
        unreachable!()
    };
    assert_eq!((f.children, f.join.clone()), (3, None));
}

#[tokio::test]
async fn an_exec_worker_fans_out_with_its_marker_line() {
    let ns = TestNs::new("fan-exec");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.ensure_events_stream().await.unwrap();
    for stage in ["shell", "kid", "merge"] {
        broker.declare_stage(stage).await.unwrap();
    }
    let exec = exec_worker_command();
    let _exec = spawn_agent(
        &ns,
        "exec-1",
        "shell",
        &["--exec", exec.as_str(), "--next", "kid", "--join", "merge"],
    )
    .await
    .unwrap();
    let mut events = broker.events().await.unwrap();
    broker
        .publish_task("shell", "E-1", "fanout=3 child:x")
        .await
        .unwrap();
    let children = children_at(&broker, "kid", 3).await;
    let ids: Vec<_> = children.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(ids, ["E-1:0", "E-1:1", "E-1:2"]);
    assert!(children.iter().all(|c| c.2.as_deref() == Some("E-1")));
    assert_eq!(children[2].1, "x n=2");
    let seen = events
        .until(&agent("exec-1"), "the fan-out", |e| {
            e.iter().any(|e| e.kind() == "task_fanned_out")
        })
        .await;
    let Some(Event::TaskFannedOut(f)) = seen.iter().find(|e| e.kind() == "task_fanned_out") else {
        unreachable!()
    };
    // No join in the marker line: the agent's --join.
    assert_eq!(
        (f.children, f.join.clone()),
        (3, Some(TestNs::stage("merge")))
    );
    assert_eq!(f.on_child_failure, ChildPolicy::Fail);
}

#[tokio::test]
async fn hostile_fan_outs_are_dead_lettered_and_publish_nothing() {
    let ns = TestNs::new("fan-hostile");
    let rig = Rig::start(&ns, &["kid"], &["--max-children", "4"]).await;
    let broker = &rig.broker;
    let mut events = rig.events().await;
    let joined =
        BasicProperties::default().with_headers(header(h::JOINED, AMQPValue::Boolean(true)));
    let cases = [
        (
            "H-bad",
            "fanout=3 fanstage=kid fanbad=1",
            "fan-out line 2: not a JSON object",
        ),
        (
            "H-many",
            "fanout=5 fanstage=kid",
            "lists 5 children, more than this agent's --max-children 4",
        ),
        (
            "H-join",
            "fanout=2 fanstage=kid join=nosuch",
            "join stage \"nosuch\", which does not exist",
        ),
        (
            "H-kid",
            "fanout=2 fanstage=nokid",
            "child stage \"nokid\", which does not exist",
        ),
        (
            "H-joined",
            "fanout=2 fanstage=kid",
            "already fanned out once",
        ),
    ];
    for (id, payload, _) in cases {
        let props = if id == "H-joined" {
            joined.clone()
        } else {
            BasicProperties::default()
        };
        publish_plain(broker, "work", id, payload, props).await;
    }
    let dead = broker.names.dead_queue(&TestNs::stage("work"));
    let letters = eventually(Duration::from_secs(30), "five dead letters", || async {
        let (ready, _) = broker.try_probe(&dead).await?.unwrap_or((0, 0));
        anyhow::ensure!(ready >= 5, "{ready} dead letters");
        broker.drain(&dead).await
    })
    .await;
    assert_eq!(letters.len(), 5);
    for (id, payload, why) in cases {
        let (_, body, headers) = letters
            .iter()
            .find(|(i, _, _)| i == id)
            .unwrap_or_else(|| panic!("no dead letter for {id}"));
        assert_eq!(body, payload, "the parent's own payload");
        let (class, error) = reasons(headers);
        assert_eq!(class, "invalid_fan_out", "{id}");
        assert!(error.contains(why), "{id}: {error:?} should say {why:?}");
    }
    // Nothing was published: no child, no queue for the unknown stages.
    let kid = broker.names.stage_queue(&TestNs::stage("kid"));
    assert_eq!(broker.probe(&kid).await, Some((0, 0)));
    for missing in ["nosuch", "nokid"] {
        let queue = broker.names.stage_queue(&TestNs::stage(missing));
        assert_eq!(broker.probe(&queue).await, None, "{missing}");
    }
    let seen = events
        .until(&agent("work-1"), "five dead-lettered", |e| {
            e.iter()
                .filter(|e| e.kind() == "task_dead_lettered")
                .count()
                == 5
        })
        .await;
    for kind in ["task_submitted", "task_fanned_out", "task_succeeded"] {
        assert!(!seen.iter().any(|e| e.kind() == kind), "{kind}");
    }
    for e in &seen {
        if let Event::TaskFailed(f) = e {
            assert_eq!(
                (f.error_class.as_str(), f.retryable),
                ("invalid_fan_out", false)
            );
        }
    }
}

#[tokio::test]
async fn a_message_with_after_is_held_and_a_malformed_one_dead_lettered() {
    let ns = TestNs::new("after");
    let rig = Rig::start(&ns, &[], &[]).await;
    let broker = &rig.broker;
    let mut events = rig.events().await;
    let text = LongString::from("A-1, B-2");
    let props = BasicProperties::default()
        .with_priority(5)
        .with_headers(header(h::AFTER, AMQPValue::LongString(text)));
    publish_plain(broker, "work", "D-1", "the payload", props).await;
    let mut list = header(
        h::AFTER,
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
            LongString::from("C-3"),
        )])),
    );
    list.insert(
        h::ON_DEPENDENCY_FAILURE.into(),
        AMQPValue::LongString(LongString::from("run")),
    );
    publish_plain(
        broker,
        "work",
        "D-2",
        "",
        BasicProperties::default().with_headers(list),
    )
    .await;
    let seen = events
        .until(&agent("work-1"), "both held", |e| {
            e.iter().filter(|e| e.kind() == "task_held").count() == 2
        })
        .await;
    let held = |id: &str| {
        seen.iter()
            .find_map(|e| match e {
                Event::TaskHeld(t) if t.task_id.as_str() == id => Some(t.clone()),
                _ => None,
            })
            .unwrap()
    };
    let d1 = held("D-1");
    assert_eq!(d1.stage.as_str(), "work");
    assert_eq!(d1.priority.get(), 5);
    let after: Vec<&str> = d1.after.iter().map(|t| t.as_str()).collect();
    assert_eq!(after, ["A-1", "B-2"]);
    assert_eq!(d1.on_dependency_failure, DependencyPolicy::Fail);
    assert_eq!(d1.payload, b"the payload");
    let d2 = held("D-2");
    assert_eq!(d2.after.len(), 1);
    assert_eq!(d2.on_dependency_failure, DependencyPolicy::Run);
    // Malformed: dead-lettered with the reason, and reported.
    let bad = [
        (
            "X-1",
            header(h::AFTER, AMQPValue::LongString(LongString::from("a b"))),
            "x-guildhall-after: dependency",
        ),
        (
            "X-2",
            {
                let mut t = header(h::AFTER, AMQPValue::LongString(LongString::from("A-1")));
                t.insert(h::DELAY.into(), AMQPValue::LongInt(5_000));
                t
            },
            "together are not supported",
        ),
    ];
    for (id, headers, _) in &bad {
        let props = BasicProperties::default().with_headers(headers.clone());
        publish_plain(broker, "work", id, "x", props).await;
    }
    let dead = broker.names.dead_queue(&TestNs::stage("work"));
    let letters = eventually(Duration::from_secs(20), "two dead letters", || async {
        let (ready, _) = broker.try_probe(&dead).await?.unwrap_or((0, 0));
        anyhow::ensure!(ready >= 2, "{ready} dead letters");
        broker.drain(&dead).await
    })
    .await;
    for (id, _, why) in &bad {
        let (_, _, headers) = letters.iter().find(|(i, _, _)| i == id).unwrap();
        let (class, error) = reasons(headers);
        assert_eq!(class, "invalid_after", "{id}");
        assert!(error.contains(why), "{id}: {error}");
    }
    let seen = events
        .until(&agent("work-1"), "two rejections", |e| {
            e.iter().filter(|e| e.kind() == "delivery_rejected").count() == 2
        })
        .await;
    for e in &seen {
        if let Event::DeliveryRejected(r) = e {
            assert_eq!(r.reason, RejectReason::InvalidAfter);
            assert!(r.dead_lettered);
        }
    }
    assert_eq!(seen.iter().filter(|e| e.kind() == "task_held").count(), 2);
    // The held ones were acked: with the agent gone (what it held unacked
    // would go back to the intake), the intake and its bands are empty,
    // and the worker never saw them.
    rig._agent.proc.signal("KILL");
    let intake = broker.names.stage_queue(&TestNs::stage("work"));
    eventually(Duration::from_secs(20), "no consumer left", || async {
        let (_, consumers) = broker.try_probe(&intake).await?.unwrap_or((0, 0));
        anyhow::ensure!(consumers == 0, "{consumers} consumers");
        Ok(())
    })
    .await;
    assert_eq!(broker.probe(&intake).await, Some((0, 0)));
    assert!(rig.worker.calls().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_fan_out_of_the_most_children_is_published_whole() {
    let ns = TestNs::new("fan-max");
    let rig = Rig::start(&ns, &["kid"], &[]).await;
    let mut events = rig.events().await;
    rig.broker
        .publish_task("work", "M-1", "fanout=10000 fanstage=kid")
        .await
        .unwrap();
    let seen = events
        .until(&agent("work-1"), "the parent's success", |e| {
            e.iter()
                .any(|e| matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str() == "M-1"))
        })
        .await;
    let submitted = seen.iter().filter(|e| e.kind() == "task_submitted").count();
    assert_eq!(submitted, 10_000);
    // Confirmed before the events: all there already.
    let kid = rig.broker.names.stage_queue(&TestNs::stage("kid"));
    assert_eq!(rig.broker.probe(&kid).await, Some((10_000, 0)));
}
