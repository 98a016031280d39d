//! Flows (issue 19), the coordinator's side, on the real broker with the
//! real binaries: a task held through `POST /api/tasks` with `after` runs
//! once every task it waits for has succeeded; the failure policies; a
//! coordinator SIGKILLed while a task is held releases it after a restart
//! without a snapshot, once; hostile requests and a forged `TaskReleased`;
//! cancelling a held task.

use guildhall_proto::headers::amqp as h;
use guildhall_proto::{Envelope, Event};
use guildhall_tests::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const TOKEN: &str = "flows-token-0123456789abcdef";

/// Two stages, `build` and `deploy`, each served by an agent calling one
/// HTTP test worker, and a coordinator (with `extra` flags).
struct Flow {
    broker: Broker,
    coordinator: Coordinator,
    worker: HttpWorker,
    _agents: Vec<Agent>,
}

impl Flow {
    async fn start(ns: &TestNs, extra: &[&str]) -> Flow {
        let broker = Broker::connect(ns).await.unwrap();
        broker.ensure_events_stream().await.unwrap();
        for stage in ["build", "deploy"] {
            broker.declare_stage(stage).await.unwrap();
        }
        let coordinator = spawn_coordinator(ns, extra).await.unwrap();
        let worker = spawn_http_worker(ns, "flow-worker").await.unwrap();
        let mut agents = Vec::new();
        for stage in ["build", "deploy"] {
            let flags = [
                "--heartbeat",
                "500ms",
                "--concurrency",
                "4",
                "--worker-url",
                worker.url.as_str(),
            ];
            agents.push(
                spawn_agent(ns, &format!("{stage}-1"), stage, &flags)
                    .await
                    .unwrap(),
            );
        }
        Flow {
            broker,
            coordinator,
            worker,
            _agents: agents,
        }
    }
}

/// Submits a plain task through the API.
async fn submit(api: &Api, stage: &str, id: &str, payload: &str) {
    let body = json!({"stage": stage, "id": id, "payload": payload}).to_string();
    let (status, body) = api.post_raw("/api/tasks", &body).await.unwrap();
    assert_eq!(status, 201, "submit {id}: {body}");
}

/// Submits a task held after `after`; the answer (status and body).
async fn hold(api: &Api, body: Value) -> (u16, Value) {
    api.post_raw("/api/tasks", &body.to_string()).await.unwrap()
}

async fn wait_task(api: &Api, id: &str, status: &str, within: Duration) -> Value {
    eventually(within, &format!("{id} {status}"), || async {
        let t = api.get_ok(&format!("/api/tasks/{id}")).await?;
        anyhow::ensure!(t["status"] == status, "{t}");
        Ok(t)
    })
    .await
}

async fn releases(api: &Api, outcome: &str) -> f64 {
    let m = api.metrics().await.unwrap();
    m.value(
        "guildhall_flow_releases_total",
        &[("reason", "dependency"), ("outcome", outcome)],
    )
    .unwrap_or(-1.0)
}

/// Every event of the stream, in order, with its sender.
async fn all_events(broker: &Broker) -> Vec<(String, Event)> {
    broker
        .read_events()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|e| {
            let sender = e.sender.to_string();
            e.events.into_iter().map(move |ev| (sender.clone(), ev))
        })
        .collect()
}

/// Where in `events` the first event `pick` accepts is.
fn position(events: &[(String, Event)], what: &str, pick: impl Fn(&Event) -> bool) -> usize {
    events
        .iter()
        .position(|(_, e)| pick(e))
        .unwrap_or_else(|| panic!("no {what} in the events stream"))
}

fn succeeded(id: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str() == id)
}

fn started(id: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e| matches!(e, Event::TaskStarted(s) if s.task_id.as_str() == id)
}

/// (a) D after A and B: held while they run, started only after both
/// succeeded, released once; the CLI's `submit --after` for a task whose
/// dependencies have finished, and `trace`'s flow section.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_after_two_others_runs_once_both_have_succeeded() {
    let ns = TestNs::new("flowa");
    let f = Flow::start(&ns, &[]).await;
    let api = &f.coordinator.api;
    submit(api, "build", "A", "sleep=2500").await;
    submit(api, "build", "B", "sleep=3000").await;
    let asked = Instant::now();
    let (status, body) = hold(
        api,
        json!({"stage": "deploy", "id": "D", "payload": "sleep=10", "after": ["A", "B"]}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "held", "{body}");
    assert_eq!(body["stage"], "deploy", "{body}");
    assert_eq!(body["waiting_for"], json!(["A", "B"]), "{body}");
    assert_eq!(body["on_dependency_failure"], "fail", "{body}");
    eprintln!(
        "flows: D held {} ms after its POST",
        asked.elapsed().as_millis()
    );
    let t = api.get_ok("/api/tasks/D").await.unwrap();
    assert_eq!(t["status"], "held", "{t}");
    assert_eq!(t["flow"]["after"][0]["waiting"], true, "{t}");

    wait_task(api, "D", "succeeded", Duration::from_secs(40)).await;
    let events = all_events(&f.broker).await;
    let d_started = position(&events, "D's start", started("D"));
    for dep in ["A", "B"] {
        let done = position(&events, &format!("{dep}'s success"), succeeded(dep));
        assert!(done < d_started, "D started before {dep} succeeded");
    }
    let released: Vec<&(String, Event)> = events
        .iter()
        .filter(|(_, e)| matches!(e, Event::TaskReleased(r) if r.task_id.as_str() == "D"))
        .collect();
    assert_eq!(released.len(), 1, "{released:?}");
    assert!(released[0].0.starts_with("coordinator-"), "{released:?}");
    assert_eq!(f.worker.calls().await.unwrap().get("D/deploy/1"), Some(&1));
    eventually(Duration::from_secs(10), "one release counted", || async {
        let n = releases(api, "published").await;
        anyhow::ensure!(n == 1.0, "{n}");
        Ok(())
    })
    .await;

    // The trace's flow section.
    let out = run_guildhall(&["trace", "--api-url", api.base.as_str(), "D"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("flow: root A"), "{text}");
    assert!(
        text.contains("after: A (succeeded), B (succeeded) (on dependency failure: fail)"),
        "{text}"
    );

    // The CLI: dependencies already finished, so it is queued at once.
    let out = run_guildhall(&[
        "submit",
        "--api-url",
        api.base.as_str(),
        "--stage",
        "deploy",
        "--id",
        "E",
        "--payload",
        "sleep=10",
        "--after",
        "A,B",
        "--on-dependency-failure",
        "run",
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text,
        "E\nnot held: A, B already finished; queued at deploy\n"
    );
    wait_task(api, "E", "succeeded", Duration::from_secs(20)).await;
}

/// (b) A dead-lettered: D (`fail`) is dead-lettered at its stage with the
/// reason headers (listed by `GET /api/dead/deploy`), E (`run`) runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dependency_dead_letters_fail_and_runs_run() {
    let ns = TestNs::new("flowb");
    let f = Flow::start(&ns, &[]).await;
    let api = &f.coordinator.api;
    submit(api, "build", "A", "sleep=2000 fail=permanent").await;
    for (id, policy) in [("D", "fail"), ("E", "run")] {
        let (status, body) = hold(
            api,
            json!({"stage": "deploy", "id": id, "payload": "sleep=10",
                "after": ["A"], "on_dependency_failure": policy}),
        )
        .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (202, Some("held")),
            "{body}"
        );
    }
    wait_task(api, "A", "dead_lettered", Duration::from_secs(30)).await;
    let d = wait_task(api, "D", "dead_lettered", Duration::from_secs(20)).await;
    let why = d["flow"]["failed_because"].as_str().unwrap_or_default();
    assert!(why.contains("dependency A dead-lettered"), "{d}");
    wait_task(api, "E", "succeeded", Duration::from_secs(20)).await;
    let calls = f.worker.calls().await.unwrap();
    assert_eq!(calls.get("E/deploy/1"), Some(&1), "{calls:?}");
    assert!(!calls.keys().any(|k| k.starts_with("D/")), "{calls:?}");

    // In the stage's dead-letter queue, as an agent would have put it.
    let listing = eventually(Duration::from_secs(10), "D listed", || async {
        let l = api.get_ok("/api/dead/deploy").await?;
        anyhow::ensure!(l["count"] == 1, "{l}");
        Ok(l)
    })
    .await;
    let dead = &listing["tasks"][0];
    assert_eq!(dead["id"], "D", "{listing}");
    assert_eq!(dead["error_class"], "flow", "{listing}");
    assert!(
        dead["dead_by"]
            .as_str()
            .unwrap()
            .starts_with("coordinator-")
    );
    assert!(
        dead["error"]
            .as_str()
            .unwrap()
            .contains("dependency A dead-lettered"),
        "{listing}"
    );
    let msgs = f
        .broker
        .drain(&ns.names.dead_queue(&TestNs::stage("deploy")))
        .await
        .unwrap();
    assert_eq!(msgs.len(), 1);
    let (id, payload, headers) = &msgs[0];
    assert_eq!((id.as_str(), payload.as_str()), ("D", "sleep=10"));
    let text = |k: &str| guildhall_broker::task::header_str(headers, k).unwrap_or_default();
    assert_eq!(text(h::DEAD_STAGE), "deploy");
    assert!(text(h::LAST_ERROR).contains("dependency A"));
    eventually(Duration::from_secs(10), "releases counted", || async {
        let (dead, published) = (
            releases(api, "dead_lettered").await,
            releases(api, "published").await,
        );
        anyhow::ensure!((dead, published) == (1.0, 1.0), "{dead} {published}");
        Ok(())
    })
    .await;
}

/// (c) The coordinator SIGKILLed while D is held, and started again
/// without a snapshot: the new one finds D in the stream and releases it
/// once A has finished; the worker runs D once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_task_survives_a_coordinator_killed_and_restarted_without_a_snapshot() {
    let ns = TestNs::new("flowc");
    let mut f = Flow::start(&ns, &[]).await;
    let api = f.coordinator.api.clone();
    submit(&api, "build", "A", "sleep=5000").await;
    let (status, body) = hold(
        &api,
        json!({"stage": "deploy", "id": "D", "payload": "sleep=10", "after": ["A"]}),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("held")),
        "{body}"
    );
    f.coordinator.proc.signal("KILL");
    f.coordinator
        .proc
        .wait(Duration::from_secs(10))
        .await
        .unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let t = eventually(Duration::from_secs(20), "D held again", || async {
        let t = c.api.get_ok("/api/tasks/D").await?;
        anyhow::ensure!(
            t["status"] == "held" || t["status"] == "running" || t["status"] == "succeeded",
            "{t}"
        );
        Ok(t)
    })
    .await;
    assert_eq!(t["flow"]["after"][0]["id"], "A", "{t}");
    wait_task(&c.api, "D", "succeeded", Duration::from_secs(40)).await;
    let events = all_events(&f.broker).await;
    let starts = events.iter().filter(|(_, e)| started("D")(e)).count();
    assert_eq!(starts, 1, "D started {starts} times");
    assert!(
        position(&events, "A's success", succeeded("A"))
            < position(&events, "D's start", started("D"))
    );
    let calls = f.worker.calls().await.unwrap();
    assert_eq!(calls.get("D/deploy/1"), Some(&1), "{calls:?}");
    assert!(!calls.contains_key("D/deploy/2"), "{calls:?}");
    f.coordinator = c;
}

/// (d) Hostile requests: every refusal with its status and one JSON
/// message; the CLI's bad input; a `TaskReleased` forged by a sender that
/// is not a coordinator is counted and releases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_held_submissions_are_refused_and_a_forged_release_does_nothing() {
    let ns = TestNs::new("flowd");
    let f = Flow::start(&ns, &["--api-token", TOKEN]).await;
    let open = &f.coordinator.api;
    let api = &open.with_token(TOKEN);
    submit(api, "build", "P", "sleep=30000").await;
    // Known to the coordinator (read from the stream) before it is named.
    eventually(Duration::from_secs(10), "P known", || async {
        api.get_ok("/api/tasks/P").await.map(drop)
    })
    .await;
    // Refused before anything waits.
    let held = |after: Value| json!({"stage": "deploy", "payload": "x", "after": after});
    let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    let mut big = held(json!(["P"]));
    big["payload"] = json!("x".repeat(256 * 1024 + 1));
    let mut bad_policy = held(json!(["P"]));
    bad_policy["on_dependency_failure"] = json!("maybe");
    let mut delayed = held(json!(["P"]));
    delayed["delay_ms"] = json!(1000);
    let mut existing = held(json!(["P"]));
    existing["id"] = json!("P");
    for (body, want, says) in [
        (
            held(json!(["bad id"])),
            400,
            "after: invalid task id \"bad id\"",
        ),
        (held(json!("P")), 400, "after must be a list"),
        (held(json!(many)), 400, "more than 64"),
        (bad_policy, 400, "on_dependency_failure must be"),
        (delayed, 400, "after and delay together are not supported"),
        (big, 413, "exceeds the 262144-byte limit"),
        (existing, 409, "task P exists already"),
        (
            json!({"stage": "deploy", "id": "S", "after": ["S"]}),
            400,
            "cycle: S -> S",
        ),
        (
            json!({"stage": "nowhere", "after": ["P"]}),
            404,
            "unknown stage 'nowhere'",
        ),
    ] {
        let (status, answer) = hold(api, body.clone()).await;
        let error = answer["error"].as_str().unwrap_or_default();
        assert_eq!(status, want, "{body}: {answer}");
        assert!(error.contains(says), "{body}: {answer}");
    }
    // Submitting is a control route: the token is needed.
    let (status, _) = hold(open, held(json!(["P"]))).await;
    assert_eq!(status, 401);

    // An unknown dependency is waited for (2 s), then refused.
    let asked = Instant::now();
    let (status, answer) = hold(api, held(json!(["P", "NOPE-1"]))).await;
    assert_eq!(status, 400, "{answer}");
    assert!(asked.elapsed() >= Duration::from_secs(2), "not waited for");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("NOPE-1") && error.contains("never seen"),
        "{error}"
    );

    // A cycle through a held task named before its dependency existed (as
    // an agent holds a message whose x-guildhall-after names an id it has
    // not seen yet).
    let forged_hold = Envelope {
        sender: "producer-1".parse().unwrap(),
        incarnation: 1,
        seq: 1,
        sent_at_ms: guildhall_broker::now_ms(),
        events: vec![Event::TaskHeld(Box::new(guildhall_proto::TaskHeld {
            at_ms: guildhall_broker::now_ms(),
            task_id: "CY-B".parse().unwrap(),
            stage: TestNs::stage("deploy"),
            priority: Default::default(),
            after: vec!["CY-A".parse().unwrap()],
            on_dependency_failure: Default::default(),
            payload: b"b".to_vec(),
        }))],
    };
    f.broker
        .publish_raw_event(&forged_hold.encode().unwrap())
        .await
        .unwrap();
    wait_task(api, "CY-B", "held", Duration::from_secs(10)).await;
    let (status, answer) = hold(
        api,
        json!({"stage": "deploy", "id": "CY-A", "after": ["CY-B"]}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("cycle: CY-A -> CY-B -> CY-A"),
        "{answer}"
    );

    // The command line: bad input exits 2 with one line.
    let base = [
        "submit",
        "--api-url",
        open.base.as_str(),
        "--api-token",
        TOKEN,
        "--stage",
        "deploy",
    ];
    for bad in [
        &["--after", "bad id"][..],
        &["--after", "P", "--on-dependency-failure", "maybe"],
        &["--after", "P", "--delay", "5s"],
        &["--after", "NOPE-2"],
    ] {
        let out = run_guildhall(&[&base[..], bad].concat()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{bad:?}: {stderr}");
    }

    // A held task, and a TaskReleased for it from a producer's sender.
    let (status, answer) = hold(api, json!({"stage": "deploy", "id": "H", "after": ["P"]})).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (202, Some("held")),
        "{answer}"
    );
    let forged = Envelope {
        sender: "mallory-producer".parse().unwrap(),
        incarnation: 7,
        seq: 1,
        sent_at_ms: guildhall_broker::now_ms(),
        events: vec![Event::TaskReleased(guildhall_proto::TaskReleased {
            at_ms: guildhall_broker::now_ms(),
            task_id: "H".parse().unwrap(),
            stage: TestNs::stage("deploy"),
            reason: guildhall_proto::flow::HoldReason::Dependency,
            outcome: guildhall_proto::ReleaseOutcome::Published,
        })],
    };
    f.broker
        .publish_raw_event(&forged.encode().unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the forgery counted", || async {
        let m = api.metrics().await?;
        let n = m
            .value(
                "guildhall_events_malformed_total",
                &[("reason", "forged_control")],
            )
            .unwrap_or(0.0);
        anyhow::ensure!(n >= 1.0, "{n}");
        Ok(())
    })
    .await;
    let t = api.get_ok("/api/tasks/H").await.unwrap();
    assert_eq!(t["status"], "held", "{t}");
    assert_eq!(t["flow"]["waiting_for"], json!(["dependency P"]), "{t}");
    assert_eq!(releases(api, "published").await, 0.0);
    assert!(!f.worker.calls().await.unwrap().contains_key("H/deploy/1"));
}

/// (e) Cancelling a held task: it is cancelled at once (it is in no
/// queue), and a task held after it with `fail` is dead-lettered with
/// "cancelled" in the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_held_task_fails_its_dependents() {
    let ns = TestNs::new("flowe");
    let f = Flow::start(&ns, &[]).await;
    let api = &f.coordinator.api;
    submit(api, "build", "P", "sleep=30000").await;
    for (id, after) in [("H", "P"), ("H2", "H")] {
        let (status, body) = hold(
            api,
            json!({"stage": "deploy", "id": id, "payload": "x", "after": [after]}),
        )
        .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (202, Some("held")),
            "{body}"
        );
    }
    let (status, body) = api.delete("/api/tasks/H").await.unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["with_children"].as_u64()),
        (Some("held"), Some(0)),
        "{body}"
    );
    let t = wait_task(api, "H", "cancelled", Duration::from_secs(10)).await;
    assert_eq!(t["cancel"]["state"], "cancelled", "{t}");
    let t = wait_task(api, "H2", "dead_lettered", Duration::from_secs(20)).await;
    let why = t["flow"]["failed_because"].as_str().unwrap_or_default();
    assert!(why.contains("dependency H cancelled"), "{t}");
    let dead = eventually(Duration::from_secs(10), "H2 dead-lettered", || async {
        let l = api.get_ok("/api/dead/deploy").await?;
        anyhow::ensure!(l["count"] == 1, "{l}");
        Ok(l)
    })
    .await;
    assert_eq!(dead["tasks"][0]["id"], "H2", "{dead}");
    assert!(
        dead["tasks"][0]["error"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{dead}"
    );
    let calls = f.worker.calls().await.unwrap();
    assert!(!calls.keys().any(|k| k.starts_with("H")), "{calls:?}");
}

/// A release whose stage has no queue any more is retried, not dropped:
/// the gauge and the task's page say so (and why) until the queue is back,
/// then it is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_its_stage_cannot_take_is_retried_and_shown_until_it_can() {
    let ns = TestNs::new("flowf");
    let f = Flow::start(&ns, &[]).await;
    let api = &f.coordinator.api;
    f.broker.declare_stage("gone").await.unwrap();
    submit(api, "build", "A", "sleep=1500").await;
    let (status, body) = hold(
        api,
        json!({"stage": "gone", "id": "G", "payload": "g", "after": ["A"], "priority": 8}),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("held")),
        "{body}"
    );
    // The stage's queues go away before A finishes.
    let stage = TestNs::stage("gone");
    let queues = [
        ns.names.stage_queue(&stage),
        ns.names.band_queue(&stage, guildhall_proto::Band::High),
        ns.names.band_queue(&stage, guildhall_proto::Band::Mid),
        ns.names.band_queue(&stage, guildhall_proto::Band::Low),
    ];
    for q in &queues {
        guildhall_broker::topology::delete_queue(&f.broker.conn, q)
            .await
            .unwrap();
    }
    wait_task(api, "A", "succeeded", Duration::from_secs(20)).await;
    let t = eventually(Duration::from_secs(15), "G's release retried", || async {
        let t = api.get_ok("/api/tasks/G").await?;
        anyhow::ensure!(t["flow"]["release"]["state"] == "retrying", "{t}");
        Ok(t)
    })
    .await;
    let error = t["flow"]["release"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("no queue for stage gone"), "{t}");
    assert_eq!(t["status"], "held", "{t}");
    let m = api.metrics().await.unwrap();
    assert_eq!(m.value("guildhall_flow_releases_stalled", &[]), Some(1.0));
    let log = f.coordinator.proc.log_text();
    assert!(
        log.contains("cannot release held tasks to the stage, retrying"),
        "{log}"
    );
    // The queues are back: G is published to its band (priority 8).
    f.broker.declare_stage("gone").await.unwrap();
    let msg = f.broker.take(&ns.names.stage_queue(&stage)).await;
    assert_eq!(
        msg.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some("G")
    );
    assert_eq!(*msg.delivery.properties.priority(), Some(8));
    assert_eq!(msg.delivery.data, b"g");
    eventually(Duration::from_secs(10), "G released", || async {
        let t = api.get_ok("/api/tasks/G").await?;
        anyhow::ensure!(
            t["status"] == "queued" && t["flow"]["release"].is_null(),
            "{t}"
        );
        let m = api.metrics().await?;
        anyhow::ensure!(m.value("guildhall_flow_releases_stalled", &[]) == Some(0.0));
        Ok(())
    })
    .await;
}
