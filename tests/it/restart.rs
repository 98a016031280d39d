//! The coordinator restarts: state comes back from its snapshot and the
//! events stream.
//!
//! A two-stage pipeline (`a -> b`) with one HTTP worker keeps running while
//! the coordinator is stopped; tasks submitted meanwhile are picked up from
//! the stream by the next coordinator, which starts from its snapshot. A
//! snapshot that cannot be read is one warning, and the stream is replayed
//! from the start instead.

use guildhall_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Through both stages at the first try.
    Plain,
    /// Fails once at `a` (retried), then goes through.
    RetriedAtA,
    /// Fails permanently at `b`: dead-lettered there.
    DeadAtB,
}

fn fate(i: usize) -> Fate {
    match i {
        _ if i % 10 == 3 => Fate::RetriedAtA,
        _ if i % 20 == 7 => Fate::DeadAtB,
        _ => Fate::Plain,
    }
}

fn payload(i: usize) -> String {
    let plan = match fate(i) {
        Fate::Plain => "",
        Fate::RetriedAtA => "a:fail=once",
        Fate::DeadAtB => "b:fail=permanent",
    };
    format!("restart-{i} {plan}")
}

fn id(i: usize) -> String {
    format!("R-{i:04}")
}

/// The agents of `a` (on to `b`) and `b` (the end), sharing one HTTP worker.
async fn start_pipeline(ns: &TestNs) -> (HttpWorker, Vec<Agent>) {
    let broker = Broker::connect(ns).await.unwrap();
    for stage in ["a", "b"] {
        broker.declare_stage(stage).await.unwrap();
    }
    let worker = spawn_http_worker(ns, "worker").await.unwrap();
    let common = [
        "--worker-url",
        worker.url.as_str(),
        "--concurrency",
        "4",
        "--heartbeat",
        "500ms",
        "--retry-delay",
        "100ms",
        "--retry-max-delay",
        "200ms",
    ];
    let mut a = vec!["--next", "b"];
    a.extend(common);
    let agents = vec![
        spawn_agent(ns, "a-1", "a", &a).await.unwrap(),
        spawn_agent(ns, "b-1", "b", &common).await.unwrap(),
    ];
    (worker, agents)
}

async fn submit(ns: &TestNs, range: std::ops::Range<usize>) {
    let broker = Broker::connect(ns).await.unwrap();
    for i in range {
        broker.publish_task("a", &id(i), &payload(i)).await.unwrap();
    }
}

/// Checks task `i`'s status and full stage history.
fn check_task(i: usize, t: &Value) -> anyhow::Result<()> {
    let rows: Vec<(&str, &str)> = t["attempts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["stage"].as_str().unwrap_or("?"),
                a["outcome"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    let (status, want): (&str, &[(&str, &str)]) = match fate(i) {
        Fate::Plain => ("succeeded", &[("a", "succeeded"), ("b", "succeeded")]),
        Fate::RetriedAtA => (
            "succeeded",
            &[("a", "retried"), ("a", "succeeded"), ("b", "succeeded")],
        ),
        Fate::DeadAtB => (
            "dead_lettered",
            &[("a", "succeeded"), ("b", "dead_lettered")],
        ),
    };
    anyhow::ensure!(t["status"] == status && rows == want, "{}: {t}", id(i));
    Ok(())
}

/// Every task of `0..n` answers with its history, and the counters in
/// `/metrics` and `/api/stages` are the totals of `0..n`.
async fn check_everything(api: &Api, n: usize) -> anyhow::Result<()> {
    for i in 0..n {
        check_task(i, &api.get_ok(&format!("/api/tasks/{}", id(i))).await?)?;
    }
    let count = |f: Fate| (0..n).filter(|i| fate(*i) == f).count() as f64;
    let (retried, dead) = (count(Fate::RetriedAtA), count(Fate::DeadAtB));
    let total = n as f64;
    let m = api.metrics().await?;
    let v = |name: &str, labels: &[(&str, &str)]| m.value(name, labels).unwrap_or(-1.0);
    let tasks = |stage, outcome| {
        v(
            "guildhall_tasks_total",
            &[("stage", stage), ("outcome", outcome)],
        )
    };
    let checks = [
        ("a succeeded", tasks("a", "succeeded"), total),
        ("a retried", tasks("a", "retried"), retried),
        ("b succeeded", tasks("b", "succeeded"), total - dead),
        ("b dead-lettered", tasks("b", "dead_lettered"), dead),
        (
            "completed",
            v("guildhall_tasks_completed_total", &[]),
            total - dead,
        ),
        (
            "a started",
            v("guildhall_tasks_started_total", &[("stage", "a")]),
            total + retried,
        ),
        (
            "b started",
            v("guildhall_tasks_started_total", &[("stage", "b")]),
            total,
        ),
        (
            "task_started events",
            v(
                "guildhall_events_ingested_total",
                &[("kind", "task_started")],
            ),
            2.0 * total + retried,
        ),
    ];
    for (what, got, want) in checks {
        anyhow::ensure!(got == want, "{what}: {got} != {want}");
    }
    let stages = api.get_ok("/api/stages").await?;
    let stage = |name: &str| {
        stages["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    let counts = |s: &Value| {
        ["succeeded", "failed", "retried", "dead_lettered"].map(|k| s[k].as_f64().unwrap_or(-1.0))
    };
    let (a, b) = (stage("a"), stage("b"));
    anyhow::ensure!(counts(&a) == [total, retried, retried, 0.0], "stage a: {a}");
    anyhow::ensure!(
        counts(&b) == [total - dead, dead, 0.0, dead],
        "stage b: {b}"
    );
    Ok(())
}

async fn workers_alive(api: &Api) -> anyhow::Result<()> {
    let w = api.get_ok("/api/workers").await?;
    let alive: Vec<&str> = w["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| matches!(w["status"].as_str(), Some("idle" | "processing")))
        .filter_map(|w| w["id"].as_str())
        .collect();
    anyhow::ensure!(alive == ["a-1", "b-1"], "{w}");
    Ok(())
}

fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_resumes_from_its_snapshot() {
    let ns = TestNs::new("restart");
    let data = DataDir::new("restart");
    let dir = data.flag();
    let flags = ["--data-dir", dir.as_str(), "--snapshot-interval", "1s"];
    let first = spawn_coordinator(&ns, &flags).await.unwrap();
    assert_eq!(
        lines_with(
            &first.proc.log_text(),
            "no snapshot: replaying the events stream from the start"
        )
        .len(),
        1,
        "{}",
        first.proc.log_text()
    );
    let (_worker, _agents) = start_pipeline(&ns).await;
    submit(&ns, 0..100).await;
    let api = first.api.clone();
    eventually(Duration::from_secs(60), "100 tasks through", || {
        check_everything(&api, 100)
    })
    .await;
    workers_alive(&api).await.unwrap();
    eventually(Duration::from_secs(10), "a periodic snapshot", || async {
        anyhow::ensure!(data.snapshot(&ns).is_file());
        Ok(())
    })
    .await;

    // Stopped with SIGTERM: a last snapshot is written on the way out.
    let mut first = first;
    let status = first.proc.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}");
    let log = first.proc.log_text();
    assert_eq!(lines_with(&log, "snapshot written to").len(), 1, "{log}");

    // Work goes on while the coordinator is down.
    submit(&ns, 100..150).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let second = spawn_coordinator(&ns, &flags).await.unwrap();
    let log = second.proc.log_text();
    let loaded = lines_with(&log, "loaded snapshot");
    assert_eq!(loaded.len(), 1, "{log}");
    assert!(
        loaded[0].contains(&data.snapshot(&ns).display().to_string()),
        "{log}"
    );
    assert!(
        loaded[0].contains("resuming the events stream at offset"),
        "{log}"
    );
    assert!(lines_with(&log, "no snapshot").is_empty(), "{log}");
    assert!(lines_with(&log, " WARN ").is_empty(), "{log}");
    let api = second.api.clone();
    eventually(
        Duration::from_secs(60),
        "every task from before and after, and the totals",
        || check_everything(&api, 150),
    )
    .await;
    eventually(Duration::from_secs(10), "both workers alive", || {
        workers_alive(&api)
    })
    .await;
    let health = api.get_ok("/healthz").await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_one_warning_and_the_stream_is_replayed() {
    let ns = TestNs::new("badsnap");
    let data = DataDir::new("restart");
    // The pipeline runs without a coordinator: it is not on the data path.
    let (_worker, _agents) = start_pipeline(&ns).await;
    submit(&ns, 0..20).await;
    std::fs::create_dir_all(&data.0).unwrap();
    let path = data.snapshot(&ns);
    std::fs::write(&path, b"this is not a snapshot \x00\xff").unwrap();
    let dir = data.flag();
    let flags = ["--data-dir", dir.as_str(), "--snapshot-interval", "1s"];
    let c = spawn_coordinator(&ns, &flags).await.unwrap();
    let api = c.api.clone();
    eventually(
        Duration::from_secs(60),
        "20 tasks rebuilt from the stream",
        || check_everything(&api, 20),
    )
    .await;
    let log = c.proc.log_text();
    let warnings: Vec<&str> = lines_with(&log, " WARN ")
        .into_iter()
        .filter(|l| l.contains("snapshot"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    let w = warnings[0];
    assert!(w.contains(&path.display().to_string()), "{w}");
    assert!(
        w.contains("replaying the events stream from the start"),
        "{w}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert_snapshot_replaced(&path).await;
}

/// The next snapshot (on shutdown at the latest) replaces the bad file.
async fn assert_snapshot_replaced(path: &Path) {
    eventually(Duration::from_secs(20), "a good snapshot", || async {
        let bytes = std::fs::read(path)?;
        anyhow::ensure!(bytes.len() > 100, "{} bytes", bytes.len());
        Ok(())
    })
    .await;
}
