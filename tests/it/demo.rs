//! `guildhall demo`: the newcomer's first command.

use guildhall_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_pipeline_visible_in_status_and_the_api() {
    let ns = TestNs::new("demo");
    let (mut demo, api) = spawn_demo(&ns, &["--rate", "6", "--duration", "5m"])
        .await
        .unwrap();

    let workers = eventually(
        Duration::from_secs(30),
        "six live demo workers that have done work",
        || async {
            let w = api.get_ok("/api/workers").await?;
            let list = w["workers"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(list.len() == 6, "{w}");
            for w in &list {
                anyhow::ensure!(
                    matches!(w["status"].as_str(), Some("idle" | "processing")),
                    "{w}"
                );
                anyhow::ensure!(w["done"].as_u64().unwrap_or(0) > 0, "no work yet: {w}");
            }
            Ok(list)
        },
    )
    .await;
    let mut ids: Vec<&str> = workers.iter().filter_map(|w| w["id"].as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "pm_worker-1",
            "pm_worker-2",
            "result_worker-1",
            "result_worker-2",
            "task_worker-1",
            "task_worker-2"
        ]
    );
    let done = api
        .get_ok("/api/tasks?status=succeeded&limit=5")
        .await
        .unwrap();
    let first = done["tasks"][0]["id"]
        .as_str()
        .expect("a finished task")
        .to_owned();
    let task = api.get_ok(&format!("/api/tasks/{first}")).await.unwrap();
    let stages: Vec<&str> = task["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["outcome"] == "succeeded")
        .filter_map(|a| a["stage"].as_str())
        .collect();
    assert_eq!(
        stages,
        ["task_worker", "pm_worker", "result_worker"],
        "{task}"
    );

    let out = tokio::process::Command::new(bin("guildhall"))
        .args(["status", "--api-url", &api.base])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "task_worker-1",
        "pm_worker-2",
        "result_worker",
        "STAGE",
        "WORKER",
    ] {
        assert!(text.contains(needle), "status lacks {needle}:\n{text}");
    }

    let status = demo.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(
        status.success(),
        "demo exited with {status}:\n{}",
        demo.log_text()
    );
    assert!(demo.log_text().contains("stopping"), "{}", demo.log_text());
}

#[tokio::test]
async fn without_a_broker_the_demo_says_how_to_start_one() {
    let out = tokio::process::Command::new(bin("guildhall"))
        .args([
            "demo",
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f"),
        "{err}"
    );
    assert!(err.contains("rabbitmq-server -detached"), "{err}");
}
