//! The demo cluster's worker (`deploy/demo-worker/worker.py`, which
//! docker-compose.yml runs for every stage) behind real agents and a real
//! coordinator: it speaks the HTTP hand-off, its results feed the next
//! stage, and its failures are retried or dead-lettered under its own error
//! class.

use guildhall_tests::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Starts `python3 deploy/demo-worker/worker.py` on a free port of
/// 127.0.0.1, fast and infallible unless `env` says otherwise; returns the
/// process and the URL agents POST to.
async fn spawn_demo_worker(ns: &TestNs, name: &str, env: &[(&str, &str)]) -> (Proc, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo-worker/worker.py");
    let mut vars: Vec<(&str, String)> = [
        ("PORT", "0"),
        ("HOST", "127.0.0.1"),
        ("WORKER_NAME", name),
        ("MEDIAN_MS", "10"),
        ("SPREAD", "0.5"),
        ("RETRYABLE_FAILURE_RATE", "0"),
        ("PERMANENT_FAILURE_RATE", "0"),
        ("ERROR_CLASS", ""),
        ("PERMANENT_ERROR_CLASS", ""),
        ("SEED", "1"),
        ("QUIET", "0"),
    ]
    .iter()
    .chain(env)
    .map(|(k, v)| (*k, (*v).to_owned()))
    .collect();
    vars.push(("PYTHONUNBUFFERED", "1".to_owned()));
    let (proc, line) = spawn_logged(
        ns,
        name,
        &PathBuf::from("python3"),
        &[script.display().to_string()],
        &vars,
        Some("listening on http://"),
    )
    .await
    .expect("worker.py starts (needs python3)");
    let line = line.unwrap_or_default();
    let url = line[line.find("http://").expect("a URL")..].trim();
    assert!(
        !url.ends_with(":0"),
        "PORT=0 must print the real port: {line}"
    );
    (proc, format!("{url}/"))
}

/// Waits until the coordinator lists every one of `ids` as idle.
async fn wait_idle(api: &Api, ids: &[&str]) {
    eventually(Duration::from_secs(20), "idle workers", || async {
        let w = api.get_ok("/api/workers").await?;
        for id in ids {
            let found = w["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["id"] == *id && v["status"] == "idle");
            anyhow::ensure!(found, "{id} not idle: {w}");
        }
        Ok(())
    })
    .await;
}

/// Submits a task through the API.
async fn submit(api: &Api, stage: &str, id: &str, payload: Value) {
    let body = json!({"stage": stage, "id": id, "payload": payload});
    let (status, answer) = api.post_raw("/api/tasks", &body.to_string()).await.unwrap();
    assert_eq!(status, 201, "submit {id}: {answer}");
}

/// A task's attempts as (stage, attempt, outcome) rows.
fn rows(task: &Value) -> Vec<(String, u64, String)> {
    task["attempts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["stage"].as_str().unwrap_or("?").to_owned(),
                a["attempt"].as_u64().unwrap_or(0),
                a["outcome"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

fn row(stage: &str, attempt: u64, outcome: &str) -> (String, u64, String) {
    (stage.to_owned(), attempt, outcome.to_owned())
}

/// Waits until every task in `ids` has `status`; returns their views.
async fn wait_status(api: &Api, ids: &[String], status: &str) -> Vec<Value> {
    eventually(Duration::from_secs(60), status, || async {
        let mut views = Vec::new();
        for id in ids {
            let t = api.get_ok(&format!("/api/tasks/{id}")).await?;
            anyhow::ensure!(t["status"] == status, "{id}: {t}");
            views.push(t);
        }
        Ok(views)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_go_through_two_stages_of_demo_workers() {
    let ns = TestNs::new("dw");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("task_worker").await.unwrap();
    broker.declare_stage("pm_worker").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let (first, first_url) = spawn_demo_worker(&ns, "task-worker", &[]).await;
    let (second, second_url) = spawn_demo_worker(&ns, "pm-worker", &[("MEDIAN_MS", "20")]).await;
    let common = ["--heartbeat", "500ms", "--concurrency", "2"];
    let mut args = vec!["--next", "pm_worker", "--worker-url", first_url.as_str()];
    args.extend(common);
    let _a1 = spawn_agent(&ns, "task_worker-1", "task_worker", &args)
        .await
        .unwrap();
    let mut args = vec!["--worker-url", second_url.as_str()];
    args.extend(common);
    let _a2 = spawn_agent(&ns, "pm_worker-1", "pm_worker", &args)
        .await
        .unwrap();
    wait_idle(&c.api, &["task_worker-1", "pm_worker-1"]).await;

    let ids: Vec<String> = (0..8).map(|i| format!("DW-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        submit(&c.api, "task_worker", id, json!({"n": i})).await;
    }
    let views = wait_status(&c.api, &ids, "succeeded").await;
    for t in &views {
        assert_eq!(
            rows(t),
            vec![
                row("task_worker", 1, "succeeded"),
                row("pm_worker", 1, "succeeded"),
            ],
            "{t}"
        );
        assert_eq!(t["attempts"][0]["worker"], "task_worker-1", "{t}");
        assert_eq!(t["attempts"][1]["worker"], "pm_worker-1", "{t}");
    }
    // Each worker saw the hand-off's headers: stage, task id, attempt.
    eventually(
        Duration::from_secs(10),
        "the workers' task lines",
        || async {
            let (a, b) = (first.log_text(), second.log_text());
            for id in &ids {
                anyhow::ensure!(
                    a.contains(&format!("task_worker task {id} attempt 1: ok")),
                    "{a}"
                );
                anyhow::ensure!(
                    b.contains(&format!("pm_worker task {id} attempt 1: ok")),
                    "{b}"
                );
            }
            Ok(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_worker_failures_carry_its_error_class() {
    let ns = TestNs::new("dwf");
    let broker = Broker::connect(&ns).await.unwrap();
    for stage in ["flaky", "prep", "reject"] {
        broker.declare_stage(stage).await.unwrap();
    }
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    // Every attempt fails, retryably, as db_timeout.
    let (_flaky, flaky_url) = spawn_demo_worker(
        &ns,
        "flaky-worker",
        &[
            ("RETRYABLE_FAILURE_RATE", "1"),
            ("ERROR_CLASS", "db_timeout"),
        ],
    )
    .await;
    // Succeeds, then the next stage refuses every task for good.
    let (_prep, prep_url) = spawn_demo_worker(&ns, "prep-worker", &[]).await;
    let (_reject, reject_url) = spawn_demo_worker(
        &ns,
        "reject-worker",
        &[
            ("PERMANENT_FAILURE_RATE", "1"),
            ("PERMANENT_ERROR_CLASS", "invalid_input"),
        ],
    )
    .await;
    let common = [
        "--heartbeat",
        "500ms",
        "--max-attempts",
        "2",
        "--retry-delay",
        "100ms",
        "--retry-max-delay",
        "400ms",
    ];
    let mut agents = Vec::new();
    for (id, stage, next, url) in [
        ("flaky-1", "flaky", None, &flaky_url),
        ("prep-1", "prep", Some("reject"), &prep_url),
        ("reject-1", "reject", None, &reject_url),
    ] {
        let mut args = vec!["--worker-url", url.as_str()];
        if let Some(next) = next {
            args.extend(["--next", next]);
        }
        args.extend(common);
        agents.push(spawn_agent(&ns, id, stage, &args).await.unwrap());
    }
    wait_idle(&c.api, &["flaky-1", "prep-1", "reject-1"]).await;

    let flaky: Vec<String> = (0..3).map(|i| format!("F-{i}")).collect();
    let prep: Vec<String> = (0..3).map(|i| format!("P-{i}")).collect();
    for (i, id) in flaky.iter().enumerate() {
        submit(&c.api, "flaky", id, json!({"n": i})).await;
    }
    for (i, id) in prep.iter().enumerate() {
        submit(&c.api, "prep", id, json!({"n": i})).await;
    }

    // Retryable: tried twice, then dead-lettered; every attempt has the class.
    for t in wait_status(&c.api, &flaky, "dead_lettered").await {
        assert_eq!(
            rows(&t),
            vec![row("flaky", 1, "retried"), row("flaky", 2, "dead_lettered")],
            "{t}"
        );
        for a in t["attempts"].as_array().unwrap() {
            assert_eq!(a["error_class"], "db_timeout", "{t}");
            let error = a["error"].as_str().unwrap_or_default();
            assert!(
                error.starts_with("HTTP 503: simulated retryable failure (db_timeout)"),
                "{t}"
            );
        }
    }
    // Permanent: dead-lettered at the first attempt of the second stage.
    for t in wait_status(&c.api, &prep, "dead_lettered").await {
        assert_eq!(
            rows(&t),
            vec![
                row("prep", 1, "succeeded"),
                row("reject", 1, "dead_lettered")
            ],
            "{t}"
        );
        assert_eq!(t["attempts"][1]["error_class"], "invalid_input", "{t}");
        let error = t["attempts"][1]["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("HTTP 422: "), "{t}");
    }

    // Grouped by stage and class.
    eventually(Duration::from_secs(20), "the error classes", || async {
        let v = c.api.get_ok("/api/errors").await?;
        let count = |stage: &str, class: &str| {
            v["classes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["stage"] == stage && e["error_class"] == class)
                .and_then(|e| e["count"].as_u64())
        };
        anyhow::ensure!(count("flaky", "db_timeout") == Some(6), "{v}");
        anyhow::ensure!(count("reject", "invalid_input") == Some(3), "{v}");
        Ok(())
    })
    .await;
    let m = c.api.metrics().await.unwrap();
    assert_eq!(
        m.value(
            "guildhall_task_errors_total",
            &[("stage", "flaky"), ("error_class", "db_timeout")]
        ),
        Some(6.0)
    );

    // The dead letters at `reject` carry the first stage's result: the
    // worker's JSON trail, so one stage's output was the next one's input.
    let dead = c.api.get_ok("/api/dead/reject").await.unwrap();
    assert_eq!(dead["count"], 3, "{dead}");
    for d in dead["tasks"].as_array().unwrap() {
        assert_eq!(d["error_class"], "invalid_input", "{d}");
        let preview = d["payload_preview"].as_str().unwrap_or_default();
        let payload: Value = serde_json::from_str(preview).unwrap_or_else(|e| panic!("{e}: {d}"));
        assert_eq!(payload["trail"][0]["stage"], "prep", "{d}");
        assert_eq!(payload["trail"][0]["worker"], "prep-worker", "{d}");
        assert_eq!(payload["trail"][0]["attempt"], 1, "{d}");
        assert!(payload["n"].is_u64(), "{d}");
    }
}
