//! Cancelling tasks (issue 18) on the real broker with the real binaries:
//! a queued task never starts, a running HTTP task's call is dropped and
//! not retried, a running exec task's process is killed, a finished task
//! is "already finished", bulk cancel counts first (dry run), the CLI, and
//! hostile input (unknown id 404, malformed id 400, bad filter 400, no
//! token 401).
//!
//! A scheduled task (`delay_ms`), cancelled while it really waits in the
//! delay ladder, is dropped when the ladder hands it back: the worker never
//! gets a call for it.

use guildhall_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const TOKEN: &str = "test-token-0123456789abcdef";

/// Submits a task through the API (so the coordinator knows it at once).
async fn submit(api: &Api, id: &str, payload: &str) {
    let body = json!({"stage": "work", "id": id, "payload": payload}).to_string();
    let (status, body) = api.post_raw("/api/tasks", &body).await.unwrap();
    assert!(status < 300, "submit {id}: {status} {body}");
}

async fn wait_task(api: &Api, id: &str, status: &str, within: Duration) -> Value {
    eventually(within, &format!("{id} {status}"), || async {
        let t = api.get_ok(&format!("/api/tasks/{id}")).await?;
        anyhow::ensure!(t["status"] == status, "{t}");
        Ok(t)
    })
    .await
}

/// The one attempt row of a cancelled task, checked.
fn assert_cancelled(t: &Value, by: &str, point: &str) {
    let rows = t["attempts"].as_array().expect("attempts");
    assert_eq!(rows.len(), 1, "one attempt, never retried: {t}");
    assert_eq!(rows[0]["outcome"], "cancelled", "{t}");
    assert_eq!(
        rows[0]["error"],
        format!("cancelled by {by} while {point}"),
        "{t}"
    );
    assert!(rows[0]["finished_at_ms"].as_u64().is_some(), "{t}");
    assert_eq!(t["cancel"]["state"], "cancelled", "{t}");
    assert_eq!(t["cancel"]["by"], by, "{t}");
    assert_eq!(t["cancel"]["point"], point, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_and_running_http_tasks_are_cancelled_and_finished_ones_refused() {
    let ns = TestNs::new("cancel");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &["--api-token", TOKEN])
        .await
        .unwrap();
    let worker = spawn_http_worker(&ns, "cancel-worker").await.unwrap();
    let _agent = spawn_agent(
        &ns,
        "w1",
        "work",
        &[
            "--heartbeat",
            "500ms",
            "--concurrency",
            "1",
            "--worker-url",
            worker.url.as_str(),
        ],
    )
    .await
    .unwrap();
    let open = &c.api;
    let api = &c.api.with_token(TOKEN);
    eventually(Duration::from_secs(20), "w1 idle", || async {
        let w = api.get_ok("/api/workers/w1").await?;
        anyhow::ensure!(w["status"] == "idle", "{w}");
        Ok(())
    })
    .await;

    // Queued: a backlog behind a slow task; the cancelled one never starts.
    submit(api, "B-0", "sleep=3000").await;
    wait_task(api, "B-0", "running", Duration::from_secs(20)).await;
    submit(api, "Q-1", "sleep=10").await;
    submit(api, "Q-2", "sleep=10").await;
    let (status, body) = api.delete("/api/tasks/Q-1").await.unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["result"].as_str(), body["status"].as_str()),
        (Some("requested"), Some("queued"))
    );
    // Asked again while it waits: accepted, nothing new.
    let (status, body) = api.delete("/api/tasks/Q-1").await.unwrap();
    assert_eq!(
        (status, body["result"].as_str()),
        (202, Some("already_requested")),
        "{body}"
    );
    let q1 = wait_task(api, "Q-1", "cancelled", Duration::from_secs(30)).await;
    assert_cancelled(&q1, "api", "queued");
    wait_task(api, "Q-2", "succeeded", Duration::from_secs(20)).await;
    let calls = worker.calls().await.unwrap();
    assert!(
        !calls.keys().any(|k| k.starts_with("Q-1/")),
        "Q-1 reached the worker: {calls:?}"
    );
    assert_eq!(calls.get("Q-2/work/1"), Some(&1), "{calls:?}");

    // Running: the HTTP call is dropped at once (the agent is free long
    // before the worker's 30 s), and the task is not retried.
    submit(api, "R-1", "sleep=30000").await;
    wait_task(api, "R-1", "running", Duration::from_secs(20)).await;
    let started = std::time::Instant::now();
    let (status, body) = api.delete("/api/tasks/R-1?by=alice").await.unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("running")),
        "{body}"
    );
    let r1 = wait_task(api, "R-1", "cancelled", Duration::from_secs(20)).await;
    eprintln!(
        "cancel: a running HTTP task stopped and recorded {} ms after DELETE",
        started.elapsed().as_millis()
    );
    assert_cancelled(&r1, "alice", "running");
    submit(api, "N-1", "sleep=10").await;
    wait_task(api, "N-1", "succeeded", Duration::from_secs(20)).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the call was not dropped"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = worker.calls().await.unwrap();
    assert_eq!(calls.get("R-1/work/1"), Some(&1), "{calls:?}");
    assert!(!calls.contains_key("R-1/work/2"), "retried: {calls:?}");
    assert_eq!(
        api.get_ok("/api/tasks/R-1").await.unwrap()["status"],
        "cancelled"
    );

    // Finished: refused as already finished (also a cancelled one).
    for id in ["N-1", "R-1"] {
        let (status, body) = api.delete(&format!("/api/tasks/{id}")).await.unwrap();
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["result"], "already_finished", "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("already finished"),
            "{body}"
        );
    }

    // Bulk: a dry run counts first and cancels nothing; then the cancel.
    submit(api, "B-1", "sleep=8000").await;
    wait_task(api, "B-1", "running", Duration::from_secs(20)).await;
    for i in 0..5 {
        submit(api, &format!("bulk-{i}"), "sleep=10").await;
    }
    let filter = json!({"stage": "work", "status": "queued", "prefix": "bulk-", "dry_run": true});
    // The coordinator learns of a submission from the events stream.
    let body = eventually(Duration::from_secs(10), "5 bulk tasks known", || async {
        let (status, body) = api
            .post_raw("/api/tasks/cancel", &filter.to_string())
            .await?;
        anyhow::ensure!(status == 200 && body["count"] == 5, "{status} {body}");
        Ok(body)
    })
    .await;
    assert_eq!(body["sample"].as_array().map(Vec::len), Some(5), "{body}");
    assert_eq!(
        api.get_ok("/api/tasks/bulk-0").await.unwrap()["cancel"],
        Value::Null
    );
    let filter = json!({"prefix": "bulk-", "status": "queued", "by": "ops"});
    let (status, body) = api
        .post_raw("/api/tasks/cancel", &filter.to_string())
        .await
        .unwrap();
    assert_eq!(
        (status, body["cancelled"].as_u64()),
        (202, Some(5)),
        "{body}"
    );
    for i in 0..5 {
        let t = wait_task(
            api,
            &format!("bulk-{i}"),
            "cancelled",
            Duration::from_secs(30),
        )
        .await;
        assert_cancelled(&t, "ops", "queued");
    }
    let calls = worker.calls().await.unwrap();
    assert!(!calls.keys().any(|k| k.starts_with("bulk-")), "{calls:?}");

    // The command line.
    submit(api, "B-2", "sleep=3000").await;
    wait_task(api, "B-2", "running", Duration::from_secs(20)).await;
    submit(api, "cli-1", "sleep=10").await;
    let base = [
        "cancel",
        "--api-url",
        open.base.as_str(),
        "--api-token",
        TOKEN,
    ];
    let out = run_guildhall(&[&base[..], &["cli-1"]].concat()).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("cli-1: cancel requested (was queued)"),
        "{stdout}"
    );
    let t = wait_task(api, "cli-1", "cancelled", Duration::from_secs(30)).await;
    assert_cancelled(&t, "cli", "queued");
    let out = run_guildhall(&[&base[..], &["--prefix", "nothing-", "--dry-run"]].concat()).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0 task(s) match (dry run"));
    for bad in [
        vec!["no-such-task"],
        vec!["bad id!"],
        vec![],
        vec!["--status", "nope"],
        vec!["x-1", "--stage", "work"],
    ] {
        let out = run_guildhall(&[&base[..], &bad[..]].concat()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{bad:?}: {stderr}");
    }

    // Metrics: requests by result, live cancels (Q-2's cancel is settled).
    let m = api.metrics().await.unwrap();
    assert!(
        m.value(
            "guildhall_cancel_requests_total",
            &[("result", "requested")]
        )
        .is_some_and(|n| n >= 8.0),
        "{}",
        m.text
            .lines()
            .filter(|l| l.contains("cancel"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        m.value(
            "guildhall_cancel_requests_total",
            &[("result", "already_finished")]
        )
        .is_some_and(|n| n >= 2.0)
    );
    assert!(m.value("guildhall_cancels_live", &[]).is_some());

    // Hostile input.
    let (status, body) = api.delete("/api/tasks/no-such-task").await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().is_some());
    for path in [
        "/api/tasks/bad%20id",
        "/api/tasks/Q-2?by=bad%20name",
        "/api/tasks/Q-2?x=1",
    ] {
        let (status, body) = api.delete(path).await.unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body["error"].as_str().is_some(), "{body}");
    }
    for bad in [
        "{}",
        "not json",
        "[]",
        r#"{"status": "nope"}"#,
        r#"{"priority": 12}"#,
        r#"{"priority": "high"}"#,
        r#"{"stage": "bad stage"}"#,
        r#"{"prefix": ""}"#,
        r#"{"stage": "work", "ids": ["x"]}"#,
        r#"{"ids": []}"#,
        r#"{"ids": ["bad id"]}"#,
        r#"{"stage": "work", "colour": "red"}"#,
        r#"{"stage": "work", "by": ""}"#,
    ] {
        let (status, body) = api.post_raw("/api/tasks/cancel", bad).await.unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].as_str().is_some(), "{body}");
    }
    let (status, _) = open.delete("/api/tasks/Q-2").await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = open
        .with_token("wrong-token-0123456789")
        .delete("/api/tasks/Q-2")
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, _) = open
        .post_raw("/api/tasks/cancel", r#"{"stage": "work"}"#)
        .await
        .unwrap();
    assert_eq!(status, 401);
    drop(broker);
}

/// A task submitted with a delay is `scheduled` and waits in the delay
/// ladder; cancelled there (202), it is dropped
/// when the ladder hands it back to its band, before the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_in_the_delay_ladder_is_cancelled_before_the_worker() {
    let ns = TestNs::new("cancels");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let worker = spawn_http_worker(&ns, "sched-worker").await.unwrap();
    let _agent = spawn_agent(
        &ns,
        "s1",
        "work",
        &["--heartbeat", "500ms", "--worker-url", worker.url.as_str()],
    )
    .await
    .unwrap();
    let api = &c.api;
    let body = json!({"stage": "work", "id": "S-1", "payload": "sleep=10", "delay_ms": 5000});
    let (status, body) = api.post_raw("/api/tasks", &body.to_string()).await.unwrap();
    assert!(status < 300, "submit S-1: {status} {body}");
    wait_task(api, "S-1", "scheduled", Duration::from_secs(10)).await;
    // Sorted off the intake into the ladder (not unacked in the sorter).
    eventually(Duration::from_secs(10), "S-1 in the ladder", || async {
        let n = broker.ladder_ready().await?;
        anyhow::ensure!(n == 1, "{n} in the ladder");
        Ok(())
    })
    .await;
    // The answer's status is the core's record (`queued`): `scheduled` is
    // how the task views show a queued task whose due time is ahead.
    let (status, body) = api.delete("/api/tasks/S-1").await.unwrap();
    assert_eq!(
        (status, body["result"].as_str(), body["status"].as_str()),
        (202, Some("requested"), Some("queued")),
        "{body}"
    );
    let t = wait_task(api, "S-1", "cancelled", Duration::from_secs(20)).await;
    assert_cancelled(&t, "api", "queued");
    assert_eq!(broker.ladder_ready().await.unwrap(), 0);
    // The agent still works: a task after it runs, and S-1 never did.
    submit(api, "S-2", "sleep=10").await;
    wait_task(api, "S-2", "succeeded", Duration::from_secs(20)).await;
    let calls = worker.calls().await.unwrap();
    assert!(
        !calls.keys().any(|k| k.starts_with("S-1/")),
        "S-1 reached the worker: {calls:?}"
    );
    assert_eq!(calls.get("S-2/work/1"), Some(&1), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_exec_task_is_killed_and_not_retried() {
    let ns = TestNs::new("cancelx");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let exec = exec_worker_command();
    let _agent = spawn_agent(
        &ns,
        "x1",
        "work",
        &[
            "--heartbeat",
            "500ms",
            "--concurrency",
            "1",
            "--exec",
            exec.as_str(),
        ],
    )
    .await
    .unwrap();
    let api = &c.api;
    // A TaskCancelRequested from a sender that is not a coordinator (an
    // agent's or a producer's id) is counted and dropped.
    submit(api, "F-1", "sleep=10").await;
    wait_task(api, "F-1", "succeeded", Duration::from_secs(20)).await;
    submit(api, "F-2", "sleep=3000").await;
    wait_task(api, "F-2", "running", Duration::from_secs(20)).await;
    let forged = guildhall_proto::Envelope {
        sender: "mallory-producer".parse().unwrap(),
        incarnation: 7,
        seq: 1,
        sent_at_ms: guildhall_broker::now_ms(),
        events: vec![guildhall_proto::Event::TaskCancelRequested(
            guildhall_proto::TaskCancelRequested {
                at_ms: guildhall_broker::now_ms(),
                task_id: "F-2".parse().unwrap(),
                by: "mallory".into(),
            },
        )],
    };
    broker
        .publish_raw_event(&forged.encode().unwrap())
        .await
        .unwrap();
    let t = wait_task(api, "F-2", "succeeded", Duration::from_secs(20)).await;
    assert_eq!(t["cancel"], Value::Null, "{t}");

    let dir = std::env::temp_dir().join(format!("guildhall-cancel-{}", ns.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("pid");
    submit(
        api,
        "X-1",
        &format!("sleep=60000 pidfile={}", pidfile.display()),
    )
    .await;
    wait_task(api, "X-1", "running", Duration::from_secs(20)).await;
    let pid: u32 = eventually(Duration::from_secs(10), "the pid file", || async {
        Ok(std::fs::read_to_string(&pidfile)?.trim().parse::<u32>()?)
    })
    .await;
    std::fs::remove_file(&pidfile).unwrap();
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
    };
    assert!(alive(pid));
    let (status, body) = api.delete("/api/tasks/X-1").await.unwrap();
    assert_eq!(status, 202, "{body}");
    let asked = std::time::Instant::now();
    let t = wait_task(api, "X-1", "cancelled", Duration::from_secs(20)).await;
    eprintln!(
        "cancel: a running exec task killed and recorded {} ms after DELETE",
        asked.elapsed().as_millis()
    );
    assert_cancelled(&t, "api", "running");
    eventually(Duration::from_secs(10), "the process killed", || async {
        anyhow::ensure!(!alive(pid), "pid {pid} still runs");
        Ok(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!pidfile.exists(), "the task ran again");
    // The agent takes the next task.
    submit(api, "X-2", "sleep=10").await;
    wait_task(api, "X-2", "succeeded", Duration::from_secs(20)).await;
    let _ = std::fs::remove_dir_all(&dir);
    drop(broker);
}

/// A cancel broadcast while no agent serves the stage reaches none; the
/// coordinator is then restarted (the live cancel is rebuilt from the
/// events stream by a coordinator with another id). The agent that starts
/// later gets the live cancels on its `Hello`, and a task it started before
/// that is stopped as soon as the coordinator reads its `TaskStarted` (it
/// is never finished by the worker, never retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_cancelled_before_any_agent_serves_its_stage_is_still_stopped() {
    let ns = TestNs::new("cancell");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let mut first = spawn_coordinator(&ns, &[]).await.unwrap();
    let api = &first.api;
    submit(api, "L-1", "sleep=20000").await;
    eventually(Duration::from_secs(10), "L-1 known", || async {
        let (status, body) = api.delete("/api/tasks/L-1").await?;
        anyhow::ensure!(status == 202, "{status} {body}");
        Ok(())
    })
    .await;
    first.proc.terminate(Duration::from_secs(20)).await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let api = &c.api;
    eventually(Duration::from_secs(20), "the cancel replayed", || async {
        let t = api.get_ok("/api/tasks/L-1").await?;
        anyhow::ensure!(t["cancel"]["state"] == "requested", "{t}");
        Ok(())
    })
    .await;
    let worker = spawn_http_worker(&ns, "late-worker").await.unwrap();
    let started = std::time::Instant::now();
    let _agent = spawn_agent(
        &ns,
        "late",
        "work",
        &["--heartbeat", "500ms", "--worker-url", worker.url.as_str()],
    )
    .await
    .unwrap();
    let t = wait_task(api, "L-1", "cancelled", Duration::from_secs(15)).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopped, not finished"
    );
    let rows = t["attempts"].as_array().expect("attempts");
    assert_eq!(rows.len(), 1, "{t}");
    assert_eq!(rows[0]["outcome"], "cancelled", "{t}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = worker.calls().await.unwrap();
    assert!(calls.get("L-1/work/1").is_none_or(|n| *n == 1), "{calls:?}");
    assert!(!calls.contains_key("L-1/work/2"), "retried: {calls:?}");
    drop(broker);
}
