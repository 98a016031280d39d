//! `guildhall submit --priority/--delay/--at` and the same fields of
//! `POST /api/tasks`, against the real broker: where the task lands, and
//! every bad value refused (one line and status 2; HTTP 400 with a JSON
//! error), nothing published.

use guildhall_proto::Band;
use guildhall_proto::headers::amqp as h;
use guildhall_tests::*;
use std::process::Output;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "more than one line: {err}"
    );
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn submit_with_a_priority_or_a_delay_and_refuse_bad_ones() {
    let ns = TestNs::new("psub");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("build").await.unwrap();
    let url = amqp_url();
    let common = [
        "--namespace",
        ns.name(),
        "--amqp-url",
        url.as_str(),
        "--stage",
        "build",
    ];
    let run = |extra: Vec<&'static str>| {
        let mut args = vec!["submit"];
        args.extend(common);
        args.extend(extra);
        async move { run_guildhall(&args).await }
    };
    let o = run(vec!["--id", "P-7", "--priority", "7", "--payload", "x"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let high = ns.names.band_queue(&TestNs::stage("build"), Band::High);
    let m = broker.take(&high).await;
    assert_eq!(*m.delivery.properties.priority(), Some(7));

    let o = run(vec!["--id", "D-2", "--delay", "2s", "--payload", "x"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let low = ns.names.band_queue(&TestNs::stage("build"), Band::Low);
    // In the ladder first, in its band after about 2 s.
    assert_eq!(broker.probe(&low).await, Some((0, 0)));
    let m = broker.take(&low).await;
    let due = guildhall_broker::task::header_u64(
        m.delivery.properties.headers().as_ref().unwrap(),
        h::DUE_AT,
    )
    .unwrap();
    assert!(guildhall_broker::now_ms() + 1_000 >= due, "arrived early");

    for (flags, needle) in [
        (vec!["--priority", "10"], "--priority"),
        (vec!["--priority", "-1"], "--priority"),
        (vec!["--priority", "high"], "--priority"),
        (vec!["--delay", "soon"], "--delay"),
        (vec!["--delay", "-5s"], "--delay"),
        (vec!["--delay", "200days"], "longest delay"),
        (vec!["--at", "tomorrow"], "--at"),
        (vec!["--at", "2999-01-01T00:00:00Z"], "longest delay"),
        (
            vec!["--delay", "5s", "--at", "2026-12-07T09:00:00Z"],
            "--at",
        ),
    ] {
        let o = run(flags.clone()).await;
        assert_one_line_error(&o, needle);
    }
    // Nothing else was published.
    assert_eq!(
        broker
            .probe(&ns.names.stage_queue(&TestNs::stage("build")))
            .await
            .map(|p| p.0),
        Some(0)
    );
}

#[tokio::test]
async fn the_api_takes_priority_delay_and_at_and_refuses_bad_ones() {
    let ns = TestNs::new("papi");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("build").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let (status, body) = c
        .api
        .post_raw("/api/tasks", r#"{"stage":"build","id":"A-9","priority":9}"#)
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["priority"], 9);
    let high = ns.names.band_queue(&TestNs::stage("build"), Band::High);
    let m = broker.take(&high).await;
    assert_eq!(*m.delivery.properties.priority(), Some(9));
    let (status, body) = c
        .api
        .post_raw(
            "/api/tasks",
            r#"{"stage":"build","id":"A-D","delay_ms":60000}"#,
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "scheduled");
    assert!(body["due_at_ms"].as_u64().is_some(), "{body}");
    for (bad, needle) in [
        (r#"{"stage":"build","priority":10}"#, "priority"),
        (r#"{"stage":"build","priority":-1}"#, "priority"),
        (r#"{"stage":"build","priority":"9"}"#, "priority"),
        (r#"{"stage":"build","priority":1.5}"#, "priority"),
        (r#"{"stage":"build","delay_ms":-5}"#, "delay_ms"),
        (r#"{"stage":"build","delay_ms":"5"}"#, "delay_ms"),
        (
            r#"{"stage":"build","delay_ms":99999999999999}"#,
            "longest delay",
        ),
        (r#"{"stage":"build","delay":"soon"}"#, "invalid delay"),
        (r#"{"stage":"build","at":"yesterday"}"#, "invalid time"),
        (
            r#"{"stage":"build","delay":"5s","at":"2026-12-07T09:00:00Z"}"#,
            "not several",
        ),
        (r#"{"stage":"build","delay":5}"#, "invalid JSON"),
    ] {
        let (status, body) = c.api.post_raw("/api/tasks", bad).await.unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{bad}: {error}");
    }
}
