//! Controls through the API and the command line, against real agents on
//! the real broker: pause really stops consumption, resume restarts it,
//! concurrency and restart reach the agent, logs are the worker's own
//! lines, drain ends the agent with no task lost, and the token guards it
//! all. A frozen agent's command times out (504); a dead one's is refused (409).

use guildhall_tests::*;
use serde_json::Value;
use std::time::Duration;

const TOKEN: &str = "test-token-0123456789abcdef";

/// A supervised HTTP test worker behind agent `id`.
async fn supervised_agent(ns: &TestNs, id: &str, stage: &str, extra: &[&str]) -> Agent {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let listen = format!("127.0.0.1:{port}");
    let worker = bin("guildhall-test-worker").display().to_string();
    let mut args = vec!["--heartbeat", "500ms", "--worker-url", url.as_str()];
    args.extend(extra);
    args.extend(["--", worker.as_str(), "http", "--listen", listen.as_str()]);
    spawn_agent(ns, id, stage, &args).await.unwrap()
}

async fn status_of(api: &Api, id: &str) -> anyhow::Result<Value> {
    api.get_ok(&format!("/api/workers/{id}")).await
}

async fn wait_status(api: &Api, id: &str, want: &str) -> Value {
    eventually(Duration::from_secs(20), &format!("{id} {want}"), || async {
        let w = status_of(api, id).await?;
        anyhow::ensure!(w["status"] == want, "{}", w["status"]);
        Ok(w)
    })
    .await
}

async fn succeeded(api: &Api) -> anyhow::Result<usize> {
    let list = api.get_ok("/api/tasks?status=succeeded&limit=1000").await?;
    Ok(list["tasks"].as_array().map_or(0, Vec::len))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_controls_reach_the_real_agent() {
    let ns = TestNs::new("ctl");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &["--api-token", TOKEN, "--queue-poll", "200ms"])
        .await
        .unwrap();
    let mut agent = supervised_agent(&ns, "w1", "work", &[]).await;
    let open = &c.api;
    let api = &c.api.with_token(TOKEN);
    wait_status(open, "w1", "idle").await;

    // Without the token (or with a wrong one) control is refused; reads are open.
    for client in [open.clone(), open.with_token("wrong-token-0123456789")] {
        let (status, body) = client.post_raw("/api/workers/w1/pause", "").await.unwrap();
        assert_eq!(status, 401, "{body}");
        assert!(body["error"].as_str().unwrap().contains("--api-token"));
        let (status, _) = client.get("/api/workers/w1/logs").await.unwrap();
        assert_eq!(status, 401);
    }
    assert_eq!(open.get("/api/workers").await.unwrap().0, 200);

    // Pause: consumption really stops; tasks published meanwhile wait.
    let (status, body) = api.post_raw("/api/workers/w1/pause", "").await.unwrap();
    assert_eq!((status, body["ok"].as_bool()), (200, Some(true)), "{body}");
    let w = wait_status(api, "w1", "paused").await;
    assert_eq!(w["stage"], "work");
    for i in 0..5 {
        broker
            .publish_task("work", &format!("C-{i}"), "sleep=10")
            .await
            .unwrap();
    }
    let stage_queue = |v: Value| {
        v["stages"]
            .as_array()
            .and_then(|l| l.iter().find(|s| s["name"] == "work").cloned())
            .unwrap_or_default()
    };
    eventually(Duration::from_secs(10), "5 ready, no consumer", || async {
        let s = stage_queue(api.get_ok("/api/stages").await?);
        anyhow::ensure!(
            s["queue"]["ready"] == 5 && s["queue"]["consumers"] == 0,
            "{}",
            s["queue"]
        );
        Ok(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        succeeded(api).await.unwrap(),
        0,
        "a paused worker takes nothing"
    );

    // Resume: it consumes again and clears the queue.
    let (status, _) = api.post_raw("/api/workers/w1/resume", "").await.unwrap();
    assert_eq!(status, 200);
    eventually(Duration::from_secs(20), "the 5 tasks done", || async {
        let n = succeeded(api).await?;
        anyhow::ensure!(n == 5, "{n}");
        Ok(())
    })
    .await;

    // Stage-wide commands reach every live worker of the stage.
    let (status, body) = api.post_raw("/api/stages/work/pause", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["worker"], "w1");
    assert_eq!(body["results"][0]["ok"], true);
    wait_status(api, "w1", "paused").await;
    let (status, _) = api.post_raw("/api/stages/work/resume", "").await.unwrap();
    assert_eq!(status, 200);
    wait_status(api, "w1", "idle").await;

    // Concurrency, with bad bodies refused before anything is sent.
    for (body, needle) in [
        ("{\"concurrency\": 0}", "from 1 to 1024"),
        ("{\"concurrency\": 5000}", "from 1 to 1024"),
        ("{\"concurrency\": \"3\"}", "from 1 to 1024"),
        ("{\"conc\": 3}", "unknown field 'conc'"),
        ("{}", "missing field 'concurrency'"),
        ("[3]", "JSON object"),
        ("three", "invalid JSON body"),
    ] {
        let (status, answer) = api
            .post_raw("/api/workers/w1/concurrency", body)
            .await
            .unwrap();
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(needle),
            "{body}: {answer}"
        );
    }
    let (status, body) = api
        .post_raw("/api/workers/w1/concurrency", "{\"concurrency\": 3}")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(10), "concurrency 3", || async {
        let w = status_of(api, "w1").await?;
        anyhow::ensure!(w["concurrency"] == 3, "{}", w["concurrency"]);
        Ok(())
    })
    .await;

    // Logs: the supervised worker's own output.
    let logs = api.get_ok("/api/workers/w1/logs?lines=50").await.unwrap();
    let lines: Vec<&str> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("listening on http://")),
        "{lines:?}"
    );
    for path in [
        "/api/workers/w1/logs?lines=0",
        "/api/workers/w1/logs?colour=red",
    ] {
        assert_eq!(api.get(path).await.unwrap().0, 400, "{path}");
    }

    // Unknown worker or stage, bad id, unknown action.
    for (path, want) in [
        ("/api/workers/nobody/pause", 404),
        ("/api/workers/bad%20id/pause", 400),
        ("/api/stages/nope/pause", 404),
        ("/api/stages/work/explode", 404),
    ] {
        let (status, body) = api.post_raw(path, "").await.unwrap();
        assert_eq!(status, want, "{path}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }

    // The command line, through the same API.
    let url = c.api.base.clone();
    let o = run_guildhall(&[
        "worker",
        "pause",
        "w1",
        "--api-url",
        &url,
        "--api-token",
        TOKEN,
    ])
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("w1: "));
    wait_status(api, "w1", "paused").await;
    let o = run_guildhall(&["worker", "resume", "w1", "--api-url", &url]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("401") && err.contains("--api-token"), "{err}");
    let o = run_guildhall(&[
        "worker",
        "resume",
        "w1",
        "--api-url",
        &url,
        "--api-token",
        TOKEN,
    ])
    .await;
    assert!(o.status.success());
    let o = run_guildhall(&[
        "worker",
        "logs",
        "w1",
        "--lines",
        "20",
        "--api-url",
        &url,
        "--api-token",
        TOKEN,
    ])
    .await;
    assert!(String::from_utf8_lossy(&o.stdout).contains("listening on http://"));

    // Restart: the worker process is restarted, the agent stays.
    let (status, body) = api.post_raw("/api/workers/w1/restart", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(20), "a restart counted", || async {
        let w = status_of(api, "w1").await?;
        anyhow::ensure!(w["restarts"] == 1 && w["status"] == "idle", "{w}");
        Ok(())
    })
    .await;

    // Drain with a task in hand: it is finished, the rest stay queued, the
    // agent exits cleanly.
    let (status, _) = api
        .post_raw("/api/workers/w1/concurrency", "{\"concurrency\": 1}")
        .await
        .unwrap();
    assert_eq!(status, 200);
    for i in 0..4 {
        broker
            .publish_task("work", &format!("D-{i}"), "sleep=1500")
            .await
            .unwrap();
    }
    let held = eventually(Duration::from_secs(10), "a D task in hand", || async {
        let w = status_of(api, "w1").await?;
        let t = w["current_tasks"][0]["task_id"].as_str().map(str::to_owned);
        t.ok_or_else(|| anyhow::anyhow!("none yet"))
    })
    .await;
    let (status, body) = api.post_raw("/api/workers/w1/drain", "").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let exit = agent.proc.wait(Duration::from_secs(20)).await.unwrap();
    assert!(exit.success(), "drained agent exited with {exit}");
    wait_status(api, "w1", "stopped").await;
    let t = api.get_ok(&format!("/api/tasks/{held}")).await.unwrap();
    assert_eq!(
        t["status"], "succeeded",
        "the task in hand was finished: {t}"
    );
    let queue = ns.names.stage_queue(&TestNs::stage("work"));
    eventually(
        Duration::from_secs(10),
        "3 D tasks still queued",
        || async {
            let left = broker.drain(&queue).await?;
            anyhow::ensure!(left.len() == 3, "{} left", left.len());
            Ok(())
        },
    )
    .await;

    // A stopped worker cannot take commands.
    let (status, body) = api.post_raw("/api/workers/w1/pause", "").await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("stopped"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_command_answers_504_and_a_dead_worker_409() {
    let ns = TestNs::new("ctlfrz");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &["--command-timeout", "1s"])
        .await
        .unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let agent = spawn_agent(
        &ns,
        "frozen",
        "work",
        &["--heartbeat", "1s", "--worker-url", worker.url.as_str()],
    )
    .await
    .unwrap();
    wait_status(&c.api, "frozen", "idle").await;
    agent.proc.signal("STOP");
    let (status, body) = c
        .api
        .post_raw("/api/workers/frozen/pause", "")
        .await
        .unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("did not confirm"),
        "{body}"
    );
    wait_status(&c.api, "frozen", "dead").await;
    let (status, body) = c
        .api
        .post_raw("/api/workers/frozen/pause", "")
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("dead"), "{body}");
    agent.proc.signal("KILL");
}

/// Reads SSE events from `resp` until `done` accepts one; returns it.
async fn next_event(
    resp: &mut reqwest::Response,
    buf: &mut String,
    mut done: impl FnMut(&str, &Value) -> bool,
) -> anyhow::Result<(String, Value)> {
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = "message".to_owned();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&data)?;
            if done(&name, &value) {
                return Ok((name, value));
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(20), resp.chunk())
            .await
            .map_err(|_| anyhow::anyhow!("no event for 20 s"))??
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_sends_state_then_changes_and_reads_can_be_protected() {
    let ns = TestNs::new("ctlsse");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let mut c = spawn_coordinator(&ns, &["--api-token", TOKEN, "--protect-reads"])
        .await
        .unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let _agent = spawn_agent(
        &ns,
        "s1",
        "work",
        &["--heartbeat", "500ms", "--worker-url", worker.url.as_str()],
    )
    .await
    .unwrap();
    let api = c.api.with_token(TOKEN);
    wait_status(&api, "s1", "idle").await;

    // Reads need the token now; /healthz does not.
    assert_eq!(c.api.get("/api/workers").await.unwrap().0, 401);
    assert_eq!(c.api.get("/healthz").await.unwrap().0, 200);
    let m = reqwest::get(format!("{}/metrics", c.api.base))
        .await
        .unwrap();
    assert_eq!(m.status().as_u16(), 401);
    let denied = reqwest::get(format!("{}/api/events", c.api.base))
        .await
        .unwrap();
    assert_eq!(denied.status().as_u16(), 401);

    // EventSource passes the token in the query.
    let mut resp = reqwest::get(format!("{}/api/events?access_token={TOKEN}", c.api.base))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buf = String::new();
    let (_, first) = next_event(&mut resp, &mut buf, |name, _| name == "workers")
        .await
        .unwrap();
    assert_eq!(first["full"], true);
    assert_eq!(first["workers"][0]["id"], "s1");
    assert_eq!(first["workers"][0]["status"], "idle");
    next_event(&mut resp, &mut buf, |name, v| {
        name == "stages" && v["stages"][0]["name"] == "work"
    })
    .await
    .unwrap();

    // A change goes out as a delta: just that worker, now paused.
    let (status, _) = api.post_raw("/api/workers/s1/pause", "").await.unwrap();
    assert_eq!(status, 200);
    let (_, delta) = next_event(&mut resp, &mut buf, |name, v| {
        name == "workers" && v["workers"][0]["status"] == "paused"
    })
    .await
    .unwrap();
    assert_eq!(delta["full"], false);
    assert_eq!(delta["workers"].as_array().unwrap().len(), 1);

    // An open stream does not hold a shutdown up: it ends.
    let status = c.proc.terminate(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "{status}");
    assert!(
        next_event(&mut resp, &mut buf, |_, _| false).await.is_err(),
        "the stream ended"
    );
}
