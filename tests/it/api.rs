//! The coordinator's API and ingest against bad input, and submission.

use guildhall_proto::{AgentId, Envelope, Event, TaskId, TaskSubmitted};
use guildhall_tests::*;
use std::time::Duration;

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let ns = TestNs::new("badreq");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("build").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let api = &c.api;
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("GET", "/api/tasks/a%20b", None, 400, "invalid task id"),
        (
            "GET",
            "/api/tasks/no-such-task",
            None,
            404,
            "no task 'no-such-task'",
        ),
        (
            "GET",
            "/api/workers/nobody",
            None,
            404,
            "no worker 'nobody'",
        ),
        (
            "GET",
            "/api/workers/bad%20id",
            None,
            400,
            "invalid agent id",
        ),
        (
            "GET",
            "/api/tasks?status=weird",
            None,
            400,
            "unknown status 'weird'",
        ),
        ("GET", "/api/tasks?limit=0", None, 400, "limit must be"),
        ("GET", "/api/tasks?limit=x", None, 400, "limit must be"),
        (
            "GET",
            "/api/tasks?stage=nope",
            None,
            404,
            "unknown stage 'nope'",
        ),
        ("GET", "/api/tasks?stage=a.b", None, 400, "invalid stage"),
        (
            "GET",
            "/api/tasks?colour=red",
            None,
            400,
            "unknown query parameter 'colour'",
        ),
        (
            "GET",
            "/no/such/route",
            None,
            404,
            "no route for GET /no/such/route",
        ),
        ("DELETE", "/api/tasks", None, 405, "DELETE is not allowed"),
        (
            "POST",
            "/api/tasks",
            Some("{\"stage\":"),
            400,
            "invalid JSON body",
        ),
        (
            "POST",
            "/api/tasks",
            Some("{}"),
            400,
            "missing field `stage`",
        ),
        (
            "POST",
            "/api/tasks",
            Some("{\"stage\":\"build\",\"colour\":1}"),
            400,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/api/tasks",
            Some("{\"stage\":\"a b\"}"),
            400,
            "invalid stage",
        ),
        (
            "POST",
            "/api/tasks",
            Some("{\"stage\":\"nope\"}"),
            404,
            "unknown stage 'nope'",
        ),
        (
            "POST",
            "/api/tasks",
            Some("{\"stage\":\"build\",\"id\":\"a/b\"}"),
            400,
            "invalid task id",
        ),
        (
            "POST",
            "/api/tasks",
            Some("{\"stage\":\"build\",\"payload\":\"x\",\"payload_base64\":\"eA==\"}"),
            400,
            "not both",
        ),
        (
            "POST",
            "/api/tasks",
            Some("{\"stage\":\"build\",\"payload_base64\":\"***\"}"),
            400,
            "not valid base64",
        ),
    ];
    let client = reqwest::Client::new();
    for (method, path, body, status, needle) in cases {
        let mut req = client.request(method.parse().unwrap(), format!("{}{path}", api.base));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), *status, "{method} {path} {body:?}");
        let json: serde_json::Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON: {e}"));
        let msg = json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no error field: {json}"));
        assert!(
            msg.contains(needle),
            "{method} {path}: {msg:?} lacks {needle:?}"
        );
    }
    // Nothing above reached a queue.
    assert!(
        broker
            .drain(&ns.names.stage_queue(&TestNs::stage("build")))
            .await
            .unwrap()
            .is_empty()
    );
    let (status, health) = api.get("/healthz").await.unwrap();
    assert!(
        matches!(
            (status, health["status"].as_str()),
            (200, Some("ok")) | (503, Some("starting"))
        ),
        "{health}"
    );
    eventually(Duration::from_secs(10), "healthy", || async {
        api.get_ok("/healthz").await
    })
    .await;
}

#[tokio::test]
async fn submitted_tasks_reach_the_queue_and_the_task_view() {
    let ns = TestNs::new("submit");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("build").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let (status, body) = c
        .api
        .post_raw(
            "/api/tasks",
            r#"{"stage":"build","id":"CODE-1234","payload":{"x":1}}"#,
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["id"], "CODE-1234");
    let (status, body) = c
        .api
        .post_raw("/api/tasks", r#"{"stage":"build","payload_base64":"AAEC"}"#)
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let generated = body["id"].as_str().unwrap().to_owned();
    let task = eventually(Duration::from_secs(10), "the task in the API", || async {
        c.api.get_ok("/api/tasks/CODE-1234").await
    })
    .await;
    assert_eq!(task["status"], "queued");
    assert_eq!(task["stage"], "build");
    assert_eq!(task["attempts"][0]["outcome"], "queued");
    let msgs = broker
        .drain(&ns.names.stage_queue(&TestNs::stage("build")))
        .await
        .unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].0, "CODE-1234");
    assert_eq!(msgs[0].1, r#"{"x":1}"#);
    assert_eq!(msgs[1].0, generated);
    assert_eq!(msgs[1].1.as_bytes(), [0u8, 1, 2]);
    let listed = c
        .api
        .get_ok("/api/tasks?status=queued&stage=build&limit=10")
        .await
        .unwrap();
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 2);
    let m = c.api.metrics().await.unwrap();
    assert_eq!(
        m.value("guildhall_tasks_submitted_total", &[("stage", "build")]),
        Some(2.0)
    );
}

#[tokio::test]
async fn unreadable_event_messages_are_counted_and_dropped() {
    let ns = TestNs::new("malformed");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("build").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    eventually(Duration::from_secs(10), "coordinator caught up", || async {
        let h = c.api.get_ok("/healthz").await?;
        anyhow::ensure!(h["core"]["caught_up"] == true, "{h}");
        Ok(())
    })
    .await;

    let good = |id: &str| Envelope {
        sender: AgentId::new("producer-1").unwrap(),
        incarnation: 1,
        seq: 1,
        sent_at_ms: guildhall_broker::now_ms(),
        events: vec![Event::TaskSubmitted(TaskSubmitted {
            at_ms: guildhall_broker::now_ms(),
            task_id: TaskId::new(id).unwrap(),
            stage: TestNs::stage("build"),
            payload_bytes: 0,
        })],
    };
    broker.publish_raw_event(b"\xff\xff garbage").await.unwrap();
    let mut wrong_version = good("T-v").encode().unwrap();
    wrong_version[0] = 9;
    broker.publish_raw_event(&wrong_version).await.unwrap();
    broker
        .publish_raw_event(&vec![1u8; (1 << 20) + 1])
        .await
        .unwrap();
    // A valid envelope whose second event is of a kind this reader lacks.
    let known = good("T-kept").encode().unwrap();
    let mut with_unknown = known[..known.len()].to_vec();
    let count_at = with_unknown.len() - (known.len() - header_len(&known));
    with_unknown[count_at] = 2;
    with_unknown.extend_from_slice(&[2, 0xc8, 0x01]);
    broker.publish_raw_event(&with_unknown).await.unwrap();
    broker
        .publish_raw_event(&good("T-after").encode().unwrap())
        .await
        .unwrap();

    let m = eventually(Duration::from_secs(10), "malformed counts", || async {
        let m = c.api.metrics().await?;
        let v = |r| m.value("guildhall_events_malformed_total", &[("reason", r)]);
        anyhow::ensure!(
            v("malformed") == Some(1.0)
                && v("version") == Some(1.0)
                && v("oversized") == Some(1.0)
                && v("unknown_event") == Some(1.0),
            "{}",
            m.text
                .lines()
                .filter(|l| l.contains("malformed"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        Ok(m)
    })
    .await;
    assert!(
        m.value(
            "guildhall_events_ingested_total",
            &[("kind", "task_submitted")]
        )
        .unwrap()
            >= 2.0
    );
    // The valid event in the mixed batch and the one after the bad ones were applied.
    for id in ["T-kept", "T-after"] {
        assert_eq!(
            c.api.get_ok(&format!("/api/tasks/{id}")).await.unwrap()["status"],
            "queued"
        );
    }
    assert_eq!(c.api.get_ok("/healthz").await.unwrap()["status"], "ok");
}

/// Length of an envelope up to (not including) its event count, found by
/// encoding the same header with no events.
fn header_len(encoded: &[u8]) -> usize {
    let decoded = guildhall_proto::decode(encoded).unwrap().envelope;
    let empty = Envelope {
        events: vec![],
        ..decoded
    };
    empty.encode().unwrap().len() - 1
}
