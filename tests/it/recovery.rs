//! Recovery features of the coordinator: dead letters, alerts, a missing or
//! refusing management API.

use guildhall_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn dead_letters_are_listed_with_their_error_and_replayed_on_demand() {
    let ns = TestNs::new("dead");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("check").await.unwrap();
    let hook = WebhookSink::start().await;
    let c = spawn_coordinator(&ns, &["--alert-webhook", &hook.url])
        .await
        .unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let _agent = spawn_agent(&ns, "check-1", "check", &["--worker-url", &worker.url])
        .await
        .unwrap();
    for i in 0..10 {
        let plan = if i < 5 { "fail=permanent-first" } else { "" };
        broker
            .publish_task("check", &format!("D-{i}"), &format!("task {i} {plan}"))
            .await
            .unwrap();
    }
    let listing = eventually(Duration::from_secs(20), "five dead letters", || async {
        let l = c.api.get_ok("/api/dead/check").await?;
        anyhow::ensure!(
            l["count"] == 5 && l["tasks"].as_array().is_some_and(|t| t.len() == 5),
            "{l}"
        );
        Ok(l)
    })
    .await;
    let first = &listing["tasks"][0];
    assert!(first["id"].as_str().unwrap().starts_with("D-"), "{first}");
    assert_eq!(first["error_class"], "http_422");
    assert!(
        first["error"]
            .as_str()
            .unwrap()
            .contains("permanent failure requested at check"),
        "{first}"
    );
    assert_eq!(first["dead_by"], "check-1");
    assert_eq!(first["attempt"], 1);
    assert!(
        first["payload_preview"]
            .as_str()
            .unwrap()
            .starts_with("task "),
        "{first}"
    );
    // Listing consumed nothing.
    assert_eq!(
        c.api.get_ok("/api/dead/check?limit=2").await.unwrap()["tasks"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(c.api.get_ok("/api/dead/check").await.unwrap()["count"], 5);
    // Each dead letter raised an alert.
    eventually(Duration::from_secs(10), "dead-letter alerts", || async {
        let alerts = hook.of_kind("task_dead_lettered");
        anyhow::ensure!(alerts.len() == 5, "{alerts:?}");
        anyhow::ensure!(
            alerts[0]["text"]
                .as_str()
                .unwrap_or("")
                .contains("dead-lettered at check")
        );
        Ok(())
    })
    .await;

    // Bad requests.
    for (body, status) in [
        ("{}", 400),
        (r#"{"ids": []}"#, 400),
        (r#"{"ids": ["D-1"], "all": true}"#, 400),
        (r#"{"ids": ["a b"]}"#, 400),
        (r#"{"every": true}"#, 400),
    ] {
        let (got, err) = c
            .api
            .post_raw("/api/dead/check/replay", body)
            .await
            .unwrap();
        assert_eq!(got, status, "{body}: {err}");
        assert!(err["error"].is_string(), "{err}");
    }
    let (status, err) = c
        .api
        .post_raw("/api/dead/nope/replay", r#"{"all": true}"#)
        .await
        .unwrap();
    assert_eq!(status, 404, "{err}");
    assert_eq!(c.api.get("/api/dead/nope").await.unwrap().0, 404);
    assert_eq!(c.api.get("/api/dead/check?limit=0").await.unwrap().0, 400);

    // Replay two by id (one unknown id is reported), then the rest.
    let (status, r) = c
        .api
        .post_raw(
            "/api/dead/check/replay",
            &json!({"ids": ["D-0", "D-3", "D-9x"]}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(ids(&r["replayed"]), ["D-0", "D-3"]);
    assert_eq!(ids(&r["not_found"]), ["D-9x"]);
    assert_eq!(c.api.get_ok("/api/dead/check").await.unwrap()["count"], 3);
    let (_, r) = c
        .api
        .post_raw("/api/dead/check/replay", r#"{"all": true}"#)
        .await
        .unwrap();
    assert_eq!(ids(&r["replayed"]), ["D-1", "D-2", "D-4"]);
    // This time the worker (fixed) accepts them: every task succeeds, and the
    // trace shows the dead letter and the success after the replay.
    eventually(
        Duration::from_secs(20),
        "replayed tasks succeed",
        || async {
            for i in 0..10 {
                let t = c.api.get_ok(&format!("/api/tasks/D-{i}")).await?;
                anyhow::ensure!(t["status"] == "succeeded", "{t}");
            }
            Ok(())
        },
    )
    .await;
    let t = c.api.get_ok("/api/tasks/D-3").await.unwrap();
    let outcomes: Vec<&str> = t["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, ["dead_lettered", "succeeded"], "{t}");
    assert_eq!(c.api.get_ok("/api/dead/check").await.unwrap()["count"], 0);
}

#[tokio::test]
async fn a_dead_worker_and_its_return_are_alerted() {
    let ns = TestNs::new("alerts");
    let hook = WebhookSink::start().await;
    let c = spawn_coordinator(&ns, &["--alert-webhook", &hook.url])
        .await
        .unwrap();
    let args = ["--simulate", "median=10ms", "--heartbeat", "300ms"];
    let agent = spawn_agent(&ns, "w-1", "work", &args).await.unwrap();
    eventually(Duration::from_secs(10), "the worker", || async {
        c.api.get_ok("/api/workers/w-1").await
    })
    .await;
    agent.proc.signal("KILL");
    let dead = eventually(Duration::from_secs(10), "a worker_dead alert", || async {
        let a = hook.of_kind("worker_dead");
        anyhow::ensure!(!a.is_empty(), "none yet");
        Ok(a[0].clone())
    })
    .await;
    assert_eq!(dead["worker"], "w-1");
    assert_eq!(dead["stage"], "work");
    assert!(
        dead["text"]
            .as_str()
            .unwrap()
            .contains("worker w-1 (work) is dead"),
        "{dead}"
    );
    assert_eq!(
        c.api.get_ok("/api/workers/w-1").await.unwrap()["status"],
        "dead"
    );
    // A killed process lost its connection already: nothing to close.
    eventually(
        Duration::from_secs(10),
        "the close attempt counted",
        || async {
            let m = c.api.metrics().await?;
            anyhow::ensure!(
                m.value("guildhall_connections_closed_total", &[])
                    .unwrap_or(0.0)
                    >= 1.0,
                "not yet"
            );
            Ok(())
        },
    )
    .await;
    let _again = spawn_agent(&ns, "w-1", "work", &args).await.unwrap();
    let back = eventually(
        Duration::from_secs(10),
        "a worker_returned alert",
        || async {
            let a = hook.of_kind("worker_returned");
            anyhow::ensure!(!a.is_empty(), "none yet");
            Ok(a[0].clone())
        },
    )
    .await;
    assert_eq!(back["worker"], "w-1");
    assert!(back["dead_for_ms"].as_u64().is_some(), "{back}");
    let m = c.api.metrics().await.unwrap();
    assert_eq!(
        m.value("guildhall_worker_deaths_total", &[("stage", "work")]),
        Some(1.0)
    );
    assert!(
        m.value("guildhall_alerts_total", &[("outcome", "sent")])
            .unwrap_or(0.0)
            >= 2.0
    );
}

#[tokio::test]
async fn an_unreachable_webhook_is_retried_and_blocks_nothing() {
    let ns = TestNs::new("hookdown");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("check").await.unwrap();
    let dead_url = format!("http://127.0.0.1:{}/hook", free_port());
    let c = spawn_coordinator(&ns, &["--alert-webhook", &dead_url])
        .await
        .unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let _agent = spawn_agent(&ns, "check-1", "check", &["--worker-url", &worker.url])
        .await
        .unwrap();
    broker
        .publish_task("check", "H-1", "fail=permanent")
        .await
        .unwrap();
    for i in 0..20 {
        broker
            .publish_task("check", &format!("H-ok-{i}"), "fine")
            .await
            .unwrap();
    }
    // The coordinator keeps up while the alert is being retried.
    eventually(Duration::from_secs(15), "tasks processed", || async {
        let t = c.api.get_ok("/api/tasks/H-1").await?;
        anyhow::ensure!(t["status"] == "dead_lettered", "{t}");
        for i in 0..20 {
            let t = c.api.get_ok(&format!("/api/tasks/H-ok-{i}")).await?;
            anyhow::ensure!(t["status"] == "succeeded", "{t}");
        }
        Ok(())
    })
    .await;
    let m = eventually(
        Duration::from_secs(30),
        "the alert given up after its retries",
        || async {
            let m = c.api.metrics().await?;
            anyhow::ensure!(
                m.value("guildhall_alerts_total", &[("outcome", "failed")]) == Some(1.0),
                "not yet"
            );
            Ok(m)
        },
    )
    .await;
    assert_eq!(
        m.value("guildhall_alerts_total", &[("outcome", "sent")])
            .unwrap_or(0.0),
        0.0
    );
    let log = c.proc.log_text();
    assert!(log.contains("alert webhook unreachable"), "{log}");
    assert!(
        log.contains("alert not delivered after 5 attempts"),
        "{log}"
    );
}

#[tokio::test]
async fn wrong_management_credentials_are_one_clear_warning() {
    let ns = TestNs::new("mgmt401");
    let c = spawn_coordinator(
        &ns,
        &["--management-url", "http://guest:wrong@127.0.0.1:15672"],
    )
    .await
    .unwrap();
    let health = eventually(Duration::from_secs(10), "healthy", || async {
        c.api.get_ok("/healthz").await
    })
    .await;
    assert_eq!(health["management_api"], false);
    let log = c.proc.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("401 Unauthorized"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("frozen workers"),
        "{}",
        warnings[0]
    );
    // A URL that is not the management API (404): the same kind of warning.
    let ns = TestNs::new("mgmt404");
    let c = spawn_coordinator(
        &ns,
        &[
            "--management-url",
            "http://guest:guest@127.0.0.1:15672/not-the-api",
        ],
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "healthy", || async {
        c.api.get_ok("/healthz").await
    })
    .await;
    let log = c.proc.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("404 Not Found"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
}
