//! Cron schedules on the real broker with the real binaries: a schedule
//! every second fires tasks a real agent runs; the coordinator is killed
//! (SIGKILL) and restarted from its snapshot directory, and every tick in
//! between is fired exactly once with `run-all` and none with `skip`; the
//! tasks carry the schedule header and their priority; hostile input to
//! `/api/schedules` and `guildhall schedule`.

use guildhall_tests::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The coordinator's `--api-token` in these tests.
const TOKEN: &str = "sekrit-token-0123456789";

/// `Some` as `Ok`, for [`eventually`].
fn ready<T>(v: Option<T>) -> anyhow::Result<T> {
    v.ok_or_else(|| anyhow::anyhow!("not yet"))
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `every@2026-12-07T06:55:01Z` -> seconds since the epoch.
fn tick_secs(task: &str) -> Option<u64> {
    let stamp = task.split_once('@')?.1;
    let t = humantime::parse_rfc3339(stamp).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// The ticks of `schedule` the worker ran: tick second -> times called.
async fn ticks_run(worker: &HttpWorker, schedule: &str) -> BTreeMap<u64, u32> {
    let mut out = BTreeMap::new();
    for (key, n) in worker.calls().await.unwrap_or_default() {
        let task = key.split('/').next().unwrap_or_default();
        if task.starts_with(&format!("{schedule}@"))
            && let Some(t) = tick_secs(task)
        {
            *out.entry(t).or_insert(0) += n;
        }
    }
    out
}

async fn post_json(api: &Api, path: &str, body: Value) -> (u16, Value) {
    api.post_raw(path, &body.to_string()).await.unwrap()
}

/// Pauses (`true`) or resumes schedule `name` through the API; the answer
/// must be 200 with the schedule's new `paused`.
async fn set_paused(api: &Api, name: &str, paused: bool) {
    let action = if paused { "pause" } else { "resume" };
    let (status, body) = api
        .post_raw(&format!("/api/schedules/{name}/{action}"), "")
        .await
        .unwrap();
    assert_eq!(
        (status, &body["schedule"]["paused"]),
        (200, &json!(paused)),
        "{body}"
    );
}

/// Runs a schedule every second through a coordinator kill of ~4 s; the
/// ticks the worker ran, and (kill time, restart time) in seconds.
async fn through_a_kill(label: &str, missed: &str) -> (BTreeMap<u64, u32>, u64, u64) {
    let ns = TestNs::new(label);
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("cron").await.unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let _agent = spawn_agent(
        &ns,
        "cron-1",
        "cron",
        &["--worker-url", worker.url.as_str(), "--heartbeat", "500ms"],
    )
    .await
    .unwrap();
    let dir = DataDir::new("cron");
    let flags = ["--data-dir", &dir.flag(), "--snapshot-interval", "1s"];
    let mut coordinator = spawn_coordinator(&ns, &flags).await.unwrap();
    let (status, body) = post_json(
        &coordinator.api,
        "/api/schedules",
        json!({"name": "every", "cron": "* * * * * *", "stage": "cron",
               "payload": "tick", "missed": missed}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["schedule"]["missed"], missed);
    eventually(Duration::from_secs(20), "three ticks run", || async {
        ready((ticks_run(&worker, "every").await.len() >= 3).then_some(()))
    })
    .await;
    coordinator.proc.signal("KILL");
    let _ = coordinator.proc.wait(Duration::from_secs(10)).await;
    let killed = now_s();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let restarted = now_s();
    let coordinator = spawn_coordinator(&ns, &flags).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "ticks after the restart",
        || async {
            let ticks = ticks_run(&worker, "every").await;
            ready(ticks.keys().any(|t| *t >= restarted + 3).then_some(()))
        },
    )
    .await;
    // Stop it, then let what was fired finish.
    let (status, body) = coordinator
        .api
        .delete("/api/schedules/every")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks = ticks_run(&worker, "every").await;
    let api = coordinator.api.clone();
    let (status, _) = api.get("/api/schedules/every").await.unwrap();
    assert_eq!(status, 404);
    (ticks, killed, restarted)
}

#[tokio::test(flavor = "multi_thread")]
async fn run_all_fires_every_tick_once_across_a_coordinator_kill() {
    let (ticks, killed, restarted) = through_a_kill("cron-all", "run-all").await;
    let first = *ticks.keys().next().unwrap();
    let last = *ticks.keys().last().unwrap();
    let missing: Vec<u64> = (first..=last).filter(|t| !ticks.contains_key(t)).collect();
    let twice: Vec<(&u64, &u32)> = ticks.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        missing.is_empty(),
        "ticks not run: {missing:?} of {ticks:?}"
    );
    assert!(twice.is_empty(), "ticks run more than once: {twice:?}");
    assert!(
        first < killed && last > restarted,
        "the ticks span the outage: {first}..{last}, down {killed}..{restarted}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn skip_fires_no_tick_missed_across_a_coordinator_kill() {
    let (ticks, killed, restarted) = through_a_kill("cron-skip", "skip").await;
    let twice: Vec<(&u64, &u32)> = ticks.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "ticks run more than once: {twice:?}");
    let during: Vec<&u64> = ticks
        .keys()
        .filter(|t| **t > killed + 1 && **t < restarted)
        .collect();
    assert!(
        during.is_empty(),
        "missed ticks fired: {during:?} (down {killed}..{restarted})"
    );
    assert!(ticks.keys().any(|t| *t >= restarted + 3), "{ticks:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tick_is_a_task_with_its_id_header_and_priority() {
    let ns = TestNs::new("cron-props");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("plain").await.unwrap();
    let coordinator = spawn_coordinator(&ns, &[]).await.unwrap();
    let (status, body) = post_json(
        &coordinator.api,
        "/api/schedules",
        json!({"name": "props", "cron": "* * * * * *", "stage": "plain",
               "payload": {"k": 1}, "priority": 8, "timezone": "Europe/Berlin"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let list = coordinator.api.get_ok("/api/schedules").await.unwrap();
    let s = &list["schedules"][0];
    assert_eq!(s["name"], "props");
    assert_eq!(s["priority"], 8);
    assert_eq!(s["timezone"], "Europe/Berlin");
    assert_eq!(s["next_ticks_ms"].as_array().map(Vec::len), Some(3));
    let queue = format!("{}.stage.plain", ns.name());
    let msgs = eventually(Duration::from_secs(15), "a tick's task", || async {
        let m = broker.drain(&queue).await.unwrap_or_default();
        ready((!m.is_empty()).then_some(m))
    })
    .await;
    let (id, payload, headers) = &msgs[0];
    // Published within a second of its tick (enqueued-at minus tick time).
    if let (Some(tick), Some(lapin::types::AMQPValue::LongLongInt(at))) = (
        tick_secs(id),
        headers.inner().get("x-guildhall-enqueued-at"),
    ) {
        let lag = *at - (tick as i64) * 1000;
        eprintln!("tick {id}: published {lag} ms after its time");
        assert!(
            (0..1000).contains(&lag),
            "published {lag} ms after its tick"
        );
    }
    assert!(id.starts_with("props@") && tick_secs(id).is_some(), "{id}");
    assert_eq!(payload, r#"{"k":1}"#);
    let header = match headers.inner().get("x-guildhall-schedule") {
        Some(lapin::types::AMQPValue::LongString(s)) => Some(s.as_bytes().to_vec()),
        _ => None,
    };
    assert_eq!(header.as_deref(), Some(&b"props"[..]), "{headers:?}");
    // The task is known to the coordinator (its TaskSubmitted was written).
    let path = format!("/api/tasks/{id}");
    eventually(
        Duration::from_secs(10),
        "the tick's task in the API",
        || async {
            ready(
                coordinator
                    .api
                    .get(&path)
                    .await
                    .ok()
                    .filter(|(s, _)| *s == 200),
            )
        },
    )
    .await;
    // Paused: nothing more; resumed with the default run-all: the ticks of
    // the pause are fired.
    set_paused(&coordinator.api, "props", true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.drain(&queue).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        broker.drain(&queue).await.unwrap().is_empty(),
        "a paused schedule fired"
    );
    set_paused(&coordinator.api, "props", false).await;
    let msgs = eventually(
        Duration::from_secs(10),
        "ticks after the resume",
        || async {
            let m = broker.drain(&queue).await.unwrap_or_default();
            ready((m.len() >= 2).then_some(m))
        },
    )
    .await;
    assert!(msgs.len() >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_schedule_requests_are_refused() {
    let ns = TestNs::new("cron-hostile");
    let coordinator = spawn_coordinator(&ns, &["--api-token", TOKEN])
        .await
        .unwrap();
    let open = coordinator.api.clone();
    let api = coordinator.api.with_token(TOKEN);
    let good = json!({"name": "n", "cron": "0 3 * * *", "stage": "s"});
    // Control routes need the token.
    let (status, _) = post_json(&open, "/api/schedules", good.clone()).await;
    assert_eq!(status, 401);
    let (status, _) = open.post_raw("/api/schedules/n/pause", "").await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = open.delete("/api/schedules/n").await.unwrap();
    assert_eq!(status, 401);
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let bad = [
        with("cron", json!("61 * * * *")),
        with("cron", json!("* * *")),
        with("cron", json!("0 0 30 2 *")),
        with("cron", json!("x".repeat(5000))),
        with("cron", json!(7)),
        with("timezone", json!("Mars/Olympus")),
        with("timezone", json!("../../etc/passwd")),
        with("name", json!("a/b")),
        with("name", json!("")),
        with("name", json!("n".repeat(65))),
        with("stage", json!("no spaces")),
        with("stage", json!("é")),
        with("priority", json!(10)),
        with("priority", json!(-1)),
        with("priority", json!("high")),
        with("missed", json!("sometimes")),
        with("payload", json!("x".repeat(300 * 1024))),
        with("payload_base64", json!("!!!")),
        with("unknown", json!(1)),
        json!({"cron": "* * * * *", "stage": "s"}),
        json!([1, 2]),
    ];
    for body in bad {
        let (status, answer) = post_json(&api, "/api/schedules", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{answer}"
        );
    }
    let (status, answer) = api.post_raw("/api/schedules", "{not json").await.unwrap();
    assert_eq!(status, 400, "{answer}");
    // Unknown schedules.
    for path in ["/api/schedules/nope/pause", "/api/schedules/nope/resume"] {
        let (status, _) = api.post_raw(path, "").await.unwrap();
        assert_eq!(status, 404, "{path}");
    }
    let (status, _) = api.get("/api/schedules/nope").await.unwrap();
    assert_eq!(status, 404);
    let (status, _) = api.delete("/api/schedules/nope").await.unwrap();
    assert_eq!(status, 404);
    let (status, _) = api
        .post_raw("/api/schedules/bad%2Fname/pause", "")
        .await
        .unwrap();
    assert_eq!(status, 400);
    // Nothing was created; a good one is.
    let (status, body) = post_json(&api, "/api/schedules", good).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = api.post_raw("/api/schedules/n/stop", "").await.unwrap();
    assert_eq!(status, 404);
    let list = api.get_ok("/api/schedules").await.unwrap();
    assert_eq!(
        list["schedules"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schedule_cli_adds_lists_pauses_removes_and_refuses_bad_input() {
    let ns = TestNs::new("cron-cli");
    let coordinator = spawn_coordinator(&ns, &["--api-token", TOKEN])
        .await
        .unwrap();
    let url = coordinator.api.base.clone();
    let dir = DataDir::new("cron");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("payload.json");
    std::fs::write(&file, br#"{"report":"full"}"#).unwrap();
    let at_file = format!("@{}", file.display());
    let run = |args: Vec<String>| async move {
        let mut all = vec!["schedule".to_owned()];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run_guildhall(&refs).await
    };
    let client = |v: &[&str]| {
        let mut a: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--api-url".into(),
            url.clone(),
            "--api-token".into(),
            TOKEN.into(),
        ]);
        a
    };
    let out = run(client(&[
        "add",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--timezone",
        "Europe/Berlin",
        "--stage",
        "report",
        "--payload",
        &at_file,
        "--priority",
        "7",
        "--missed",
        "run-once",
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("schedule nightly set"));
    let listed = run(client(&["list"])).await;
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("nightly") && text.contains("Europe/Berlin") && text.contains("run-once"),
        "{text}"
    );
    let view = coordinator
        .api
        .get_ok("/api/schedules/nightly")
        .await
        .unwrap();
    assert_eq!(view["payload_bytes"], 17);
    assert_eq!(view["priority"], 7);
    let out = run(client(&["pause", "nightly"])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = coordinator
        .api
        .get_ok("/api/schedules/nightly")
        .await
        .unwrap();
    assert_eq!(view["paused"], true);
    let out = run(client(&["resume", "nightly"])).await;
    assert!(out.status.success());
    // Bad input: one line, status 2.
    // Over the 256 KiB limit (a file: one argument may not be that long).
    let big_file = dir.0.join("big");
    std::fs::write(&big_file, "x".repeat(300 * 1024)).unwrap();
    let big = format!("@{}", big_file.display());
    // `schedule add NAME --cron CRON --stage STAGE EXTRA...`, with the client flags.
    let add = |name: &str, cron: &str, stage: &str, extra: &[&str]| {
        client(&[&["add", name, "--cron", cron, "--stage", stage][..], extra].concat())
    };
    let every = "* * * * *";
    let bad: Vec<Vec<String>> = vec![
        add("n", "61 * * * *", "s", &[]),
        add("n", every, "s", &["--timezone", "Mars/Olympus"]),
        add("a/b", every, "s", &[]),
        add("n", every, "no spaces", &[]),
        add("n", every, "s", &["--priority", "10"]),
        add("n", every, "s", &["--missed", "never"]),
        add("n", every, "s", &["--payload", &big]),
        add("n", every, "s", &["--payload", "@/nonexistent/file"]),
        client(&["remove", "nope"]),
        client(&["pause", "nope"]),
        client(&["resume", "bad/name"]),
    ];
    for args in bad {
        let out = run(args.clone()).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // Without the token: refused (status 1, the coordinator's 401).
    let out = run(vec!["list".into(), "--api-url".into(), url.clone()]).await;
    assert!(out.status.success(), "the list is a read");
    let out = run(vec![
        "remove".into(),
        "nightly".into(),
        "--api-url".into(),
        url.clone(),
    ])
    .await;
    assert!(!out.status.success());
    let out = run(client(&["remove", "nightly"])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = run(client(&["list"])).await;
    assert!(String::from_utf8_lossy(&listed.stdout).contains("no schedules"));
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_events_from_others_than_a_coordinator_are_refused() {
    use guildhall_proto::{
        AgentId, Envelope, Event, Missed, Priority, ScheduleChanged, ScheduleFired, ScheduleSpec,
        Stage, TaskId,
    };
    let ns = TestNs::new("cron-forged");
    let coordinator = spawn_coordinator(&ns, &[]).await.unwrap();
    let broker = Broker::connect(&ns).await.unwrap();
    let name = Stage::new("forged").unwrap();
    let events = vec![
        Event::ScheduleChanged(Box::new(ScheduleChanged {
            at_ms: 1,
            name: name.clone(),
            spec: Some(ScheduleSpec {
                cron: "* * * * * *".into(),
                timezone: "UTC".into(),
                stage: Stage::new("s").unwrap(),
                payload: b"evil".to_vec(),
                priority: Priority::new(9).unwrap(),
                missed: Missed::RunAll,
                paused: false,
            }),
            by: "mallory".into(),
        })),
        Event::ScheduleFired(ScheduleFired {
            at_ms: 1,
            name,
            tick_ms: 1,
            task_id: TaskId::new("forged@1970-01-01T00:00:01Z").unwrap(),
        }),
    ];
    let envelope = Envelope {
        sender: AgentId::new("agent-mallory").unwrap(),
        incarnation: 7,
        seq: 1,
        sent_at_ms: 1,
        events,
    };
    broker
        .publish_raw_event(&envelope.encode().unwrap())
        .await
        .unwrap();
    let api = coordinator.api.clone();
    eventually(
        Duration::from_secs(10),
        "the forged events counted",
        || async {
            let m = api.metrics().await?;
            let n = m
                .value(
                    "guildhall_events_malformed_total",
                    &[("reason", "schedule_refused")],
                )
                .unwrap_or(0.0);
            anyhow::ensure!(n == 2.0, "schedule_refused = {n}");
            Ok(())
        },
    )
    .await;
    let list = api.get_ok("/api/schedules").await.unwrap();
    assert_eq!(list["schedules"], json!([]), "{list}");
    assert_eq!(list["events_refused"], 2);
}
