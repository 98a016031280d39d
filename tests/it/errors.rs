//! Error tracking end to end: failures from real workers grouped by stage
//! and class in `/api/errors`, counted in `guildhall_task_errors_total`,
//! and announced by webhook when a class is new.

use guildhall_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_grouped_by_class_counted_and_announced() {
    let ns = TestNs::new("err");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let hook = WebhookSink::start().await;
    let c = spawn_coordinator(&ns, &["--alert-webhook", &hook.url])
        .await
        .unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let _agent = spawn_agent(
        &ns,
        "e1",
        "work",
        &["--heartbeat", "500ms", "--worker-url", worker.url.as_str()],
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "the worker", || async {
        c.api.get_ok("/api/workers/e1").await.map(|_| ())
    })
    .await;
    for i in 0..3 {
        broker
            .publish_task("work", &format!("E-{i}"), "fail=permanent class=bad_input")
            .await
            .unwrap();
    }
    broker
        .publish_task(
            "work",
            "E-x",
            "fail=permanent say=<script>window.__xss=1</script>",
        )
        .await
        .unwrap();
    let view = eventually(Duration::from_secs(20), "two error classes", || async {
        let v = c.api.get_ok("/api/errors").await?;
        let classes = v["classes"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(classes.len() == 2, "{v}");
        Ok(v)
    })
    .await;
    let classes = view["classes"].as_array().unwrap();
    let bad = &classes[0];
    assert_eq!(bad["stage"], "work");
    assert_eq!(bad["error_class"], "bad_input");
    assert_eq!(bad["count"], 3);
    assert_eq!(bad["samples"].as_array().unwrap().len(), 3);
    assert!(bad["first_seen_ms"].as_u64() <= bad["last_seen_ms"].as_u64());
    let other = &classes[1];
    assert_eq!(other["error_class"], "http_422", "{other}");
    let message = other["samples"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("<script>window.__xss=1</script>"),
        "kept verbatim: {message}"
    );
    let m = c.api.metrics().await.unwrap();
    assert_eq!(
        m.value(
            "guildhall_task_errors_total",
            &[("stage", "work"), ("error_class", "bad_input")]
        ),
        Some(3.0)
    );
    eventually(Duration::from_secs(20), "new-class alerts", || async {
        let alerts = hook.of_kind("error_class_new");
        anyhow::ensure!(alerts.len() == 2, "{alerts:?}");
        Ok(())
    })
    .await;
}
