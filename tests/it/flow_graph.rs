//! Flows (issue 19) as the API and the dashboard show them: a 200-child
//! fan-out joined at a later stage, a task held until the parent
//! finishes, and one held after a dead-lettered child (whose error has a
//! `<script>` in it), all written to the events stream by the test as
//! producers, agents and a coordinator would, without agents:
//! `GET /api/flows/{id}` answers the graph (400 and 404 otherwise) and the
//! page draws it, live.

use guildhall_proto::flow::HoldReason;
use guildhall_proto::flow::{ChildPolicy, DependencyPolicy};
use guildhall_proto::{
    AgentId, AgentState, Envelope, Event, Heartbeat, Hello, Priority, ReleaseOutcome,
    TaskDeadLettered, TaskFailed, TaskFannedOut, TaskHeld, TaskId, TaskReleased, TaskResult,
    TaskStarted, TaskSubmitted, TaskSucceeded, WorkerMode,
};
use guildhall_tests::*;
use std::collections::HashMap;
use std::time::Duration;

const TOKEN: &str = "flow-token-0123456789";
/// The parent's children.
const CHILDREN: u32 = 200;
/// What the dead-lettered child's worker wrote.
const XSS: &str = "bad input <script>window.__xss=1</script>";

/// Writes envelopes to the events stream, each sender's numbered in turn.
struct Writer<'a> {
    broker: &'a Broker,
    seq: HashMap<&'static str, u64>,
}

impl<'a> Writer<'a> {
    fn new(broker: &'a Broker) -> Self {
        Self {
            broker,
            seq: HashMap::new(),
        }
    }

    async fn send(&mut self, sender: &'static str, events: Vec<Event>) {
        let seq = self.seq.entry(sender).or_insert(0);
        *seq += 1;
        let envelope = Envelope {
            sender: AgentId::new(sender).unwrap(),
            incarnation: 1,
            seq: *seq,
            sent_at_ms: guildhall_broker::now_ms(),
            events,
        };
        self.broker
            .publish_raw_event(&envelope.encode().unwrap())
            .await
            .unwrap();
    }
}

/// An agent of `stage` announcing itself, with a heartbeat interval long
/// enough that it is never judged dead (its tasks would be requeued).
fn agent_hello(stage: &str) -> Vec<Event> {
    let hello = Hello {
        at_ms: now(),
        version: "0.1.0".into(),
        stage: TestNs::stage(stage),
        next: None,
        stages: vec![TestNs::stage(stage)],
        concurrency: 256,
        heartbeat_ms: 600_000,
        hostname: "flow-host".into(),
        pid: 4242,
        mode: WorkerMode::Http {
            url: "http://127.0.0.1:1/".into(),
        },
        supervised: false,
    };
    let heartbeat = Heartbeat {
        at_ms: now(),
        version: "0.1.0".into(),
        stage: TestNs::stage(stage),
        next: None,
        state: AgentState::Processing,
        concurrency: 256,
        heartbeat_ms: 600_000,
        in_hand: vec![],
        done: 0,
        failed: 0,
        worker: None,
        agent: None,
        hostname: "flow-host".into(),
        worker_restarts: 0,
        rtt_ms: Some(1),
    };
    vec![
        Event::Hello(Box::new(hello)),
        Event::Heartbeat(Box::new(heartbeat)),
    ]
}

fn tid(id: &str) -> TaskId {
    TaskId::new(id).unwrap()
}

fn now() -> u64 {
    guildhall_broker::now_ms()
}

fn submitted(id: &str, stage: &str) -> Event {
    Event::TaskSubmitted(TaskSubmitted {
        at_ms: now(),
        task_id: tid(id),
        stage: TestNs::stage(stage),
        payload_bytes: 1,
    })
}

fn started(id: &str, stage: &str) -> Event {
    Event::TaskStarted(TaskStarted {
        at_ms: now(),
        task_id: tid(id),
        stage: TestNs::stage(stage),
        attempt: 1,
        enqueued_at_ms: None,
        submitted_at_ms: None,
        redelivered: false,
    })
}

fn succeeded(id: &str, stage: &str) -> Event {
    Event::TaskSucceeded(TaskSucceeded {
        at_ms: now(),
        task_id: tid(id),
        stage: TestNs::stage(stage),
        attempt: 1,
        started_at_ms: now().saturating_sub(40),
        next: None,
        submitted_at_ms: None,
    })
}

fn held(id: &str, after: &str) -> Event {
    Event::TaskHeld(Box::new(TaskHeld {
        at_ms: now(),
        task_id: tid(id),
        stage: TestNs::stage("deploy"),
        priority: Priority::default(),
        after: vec![tid(after)],
        on_dependency_failure: DependencyPolicy::Fail,
        payload: b"{}".to_vec(),
    }))
}

/// Child `i` of P ran at `work` and succeeded, its result reported first.
fn child_done(i: u32) -> Vec<Event> {
    let id = format!("P:{i}");
    let result = format!("{{\"n\":{i}}}").into_bytes();
    vec![
        started(&id, "work"),
        Event::TaskResult(Box::new(TaskResult {
            at_ms: now(),
            task_id: tid(&id),
            parent: tid("P"),
            stage: TestNs::stage("work"),
            attempt: 1,
            result_bytes: result.len() as u64,
            stored_sha256: None,
            result: Some(result),
        })),
        succeeded(&id, "work"),
    ]
}

/// The flow: P fans out 200 children at `split` (joined at `merge`);
/// children 0-19 run, 20-59 succeeded, 199 was dead-lettered with a
/// `<script>` in its error; D waits for P, D2 for child 199 (so the
/// coordinator decides to dead-letter it, the child's error in its reason:
/// see [`release_d2`]).
async fn publish_flow(w: &mut Writer<'_>) {
    w.send("producer-flow", vec![submitted("P", "split")]).await;
    w.send("agent-split", agent_hello("split")).await;
    w.send("agent-work", agent_hello("work")).await;
    let mut events = vec![started("P", "split")];
    events.extend((0..CHILDREN).map(|i| submitted(&format!("P:{i}"), "work")));
    events.push(Event::TaskFannedOut(TaskFannedOut {
        at_ms: now(),
        task_id: tid("P"),
        stage: TestNs::stage("split"),
        attempt: 1,
        children: CHILDREN,
        join: Some(TestNs::stage("merge")),
        on_child_failure: ChildPolicy::Continue,
        priority: Priority::default(),
    }));
    events.push(succeeded("P", "split"));
    w.send("agent-split", events).await;
    // Both held before their dependencies end: D2's reason, written when
    // P:199 is dead-lettered, quotes the error its worker wrote.
    w.send("producer-flow", vec![held("D", "P"), held("D2", "P:199")])
        .await;
    let mut events: Vec<Event> = (0..20)
        .map(|i| started(&format!("P:{i}"), "work"))
        .collect();
    events.extend((20..60).flat_map(child_done));
    events.extend([
        started("P:199", "work"),
        Event::TaskFailed(TaskFailed {
            at_ms: now(),
            task_id: tid("P:199"),
            stage: TestNs::stage("work"),
            attempt: 1,
            started_at_ms: now(),
            error: XSS.into(),
            error_class: "bad_input".into(),
            retryable: false,
        }),
        Event::TaskDeadLettered(TaskDeadLettered {
            at_ms: now(),
            task_id: tid("P:199"),
            stage: TestNs::stage("work"),
            attempt: 1,
            error: XSS.into(),
        }),
    ]);
    w.send("agent-work", events).await;
}

/// What a coordinator does with D2 once it decided to dead-letter it
/// (its dependency failed): dead-letters it at its stage and writes
/// `TaskReleased`. The test writes that event itself, as a `coordinator-`
/// sender, so the views do not wait on the runtime's release loop (a
/// second `TaskReleased`, the runtime's, changes nothing).
async fn release_d2(w: &mut Writer<'_>, api: &Api) {
    let why = eventually(Duration::from_secs(30), "D2 decided", || async {
        let t = api.get_ok("/api/tasks/D2").await?;
        let why = t["flow"]["failed_because"].as_str().map(str::to_owned);
        why.ok_or_else(|| anyhow::anyhow!("no decision yet: {}", t["flow"]))
    })
    .await;
    let released = Event::TaskReleased(TaskReleased {
        at_ms: now(),
        task_id: tid("D2"),
        stage: TestNs::stage("deploy"),
        reason: HoldReason::Dependency,
        outcome: ReleaseOutcome::DeadLettered { error: why },
    });
    w.send("coordinator-flowtest", vec![released]).await;
}

/// The counts by status after [`publish_flow`] and [`release_d2`] (D2
/// dead-lettered).
fn first_counts() -> serde_json::Value {
    serde_json::json!({
        "waiting": 1, "queued": 139, "running": 20, "succeeded": 40,
        "dead_lettered": 2, "held": 1,
    })
}

async fn declare_stages(broker: &Broker) {
    for stage in ["split", "work", "merge", "deploy"] {
        broker.declare_stage(stage).await.unwrap();
    }
}

/// Waits until the whole flow is applied (D2 dead-lettered by the
/// coordinator's release) and answers `GET /api/flows/P`.
async fn flow_settled(api: &Api) -> serde_json::Value {
    eventually(Duration::from_secs(30), "the flow applied", || async {
        let f = api.get_ok("/api/flows/P").await?;
        anyhow::ensure!(f["counts"] == first_counts(), "{}", f["counts"]);
        Ok(f)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_route_answers_the_graph_400_and_404() {
    let ns = TestNs::new("flowapi");
    let broker = Broker::connect(&ns).await.unwrap();
    declare_stages(&broker).await;
    // With a token, reads stay open: only worker-written text is withheld.
    let mut c = spawn_coordinator(&ns, &["--api-token", TOKEN])
        .await
        .unwrap();
    let mut w = Writer::new(&broker);
    publish_flow(&mut w).await;
    release_d2(&mut w, &c.api.with_token(TOKEN)).await;
    let f = flow_settled(&c.api).await;
    assert_eq!(f["id"], "P");
    assert_eq!(f["root"], "P");
    assert_eq!(f["total"], 203);
    assert_eq!(f["truncated"], false);
    let nodes = f["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 203);
    let node = |id: &str| {
        nodes
            .iter()
            .find(|n| n["id"] == id)
            .unwrap_or_else(|| panic!("node {id}"))
    };
    assert_eq!(node("P")["status"], "waiting");
    assert_eq!(node("P")["parent"], serde_json::Value::Null);
    assert_eq!(node("P:0")["status"], "running");
    assert_eq!(node("P:0")["parent"], "P");
    assert_eq!(node("P:0")["stage"], "work");
    assert_eq!(node("P:20")["status"], "succeeded");
    assert_eq!(node("P:150")["status"], "queued");
    assert_eq!(node("P:199")["status"], "dead_lettered");
    assert_eq!(node("D")["status"], "held");
    assert_eq!(node("D")["stage"], "deploy");
    assert_eq!(node("D2")["status"], "dead_lettered");
    let edges = f["edges"].as_array().unwrap();
    let kind = |k: &str| edges.iter().filter(|e| e["kind"] == k).count();
    assert_eq!(kind("child"), CHILDREN as usize);
    assert_eq!(kind("after"), 2);
    for (from, to) in [("P", "D"), ("P:199", "D2")] {
        assert!(
            edges
                .iter()
                .any(|e| e["from"] == from && e["to"] == to && e["kind"] == "after"),
            "{from} -> {to}"
        );
    }
    // The same flow from any of its tasks: a child, the held dependent.
    for id in ["P:5", "D", "D2"] {
        let f = c.api.get_ok(&format!("/api/flows/{id}")).await.unwrap();
        assert_eq!(
            (f["id"].as_str(), f["root"].as_str()),
            (Some(id), Some("P"))
        );
        assert_eq!(f["total"], 203);
    }
    // An invalid id, an unknown one: JSON errors, like /api/tasks/{id}.
    let (status, body) = c.api.get("/api/flows/a%20b").await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("invalid task id"));
    let (status, body) = c.api.get("/api/flows/nobody").await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no task 'nobody'"));
    // Nothing a worker wrote is in the graph.
    assert!(!f.to_string().contains("script"), "{f}");

    // Why D2 was dead-lettered quotes the child's error: withheld from a
    // reader without the token, like the attempt errors.
    let open = c.api.get_ok("/api/tasks/D2").await.unwrap();
    assert_eq!(open["status"], "dead_lettered");
    assert_eq!(open["flow"]["failed_because"], serde_json::Value::Null);
    assert_eq!(open["flow"]["redacted"], true);
    assert_eq!(open["flow"]["after"][0]["id"], "P:199");
    assert_eq!(open["flow"]["after"][0]["status"], "dead_lettered");
    assert!(!open.to_string().contains("script"), "{open}");
    let full = c
        .api
        .with_token(TOKEN)
        .get_ok("/api/tasks/D2")
        .await
        .unwrap();
    let why = full["flow"]["failed_because"].as_str().unwrap();
    assert!(why.contains("P:199") && why.contains(XSS), "{why}");
    assert_eq!(full["flow"].get("redacted"), None);
    // The parent's place: 200 children, 41 ended, waiting.
    let p = c.api.get_ok("/api/tasks/P").await.unwrap();
    assert_eq!(p["status"], "waiting");
    assert_eq!(p["flow"]["children"]["total"], CHILDREN);
    assert_eq!(p["flow"]["children"]["state"], "waiting");
    assert_eq!(p["flow"]["dependents"], serde_json::json!(["D"]));

    // A read like the others: with --protect-reads, only with the token.
    // (The coordinator that comes back rebuilds the flow from the stream.)
    c.proc.terminate(Duration::from_secs(10)).await.unwrap();
    let c = spawn_coordinator(&ns, &["--api-token", TOKEN, "--protect-reads"])
        .await
        .unwrap();
    let (status, body) = c.api.get("/api/flows/P").await.unwrap();
    assert_eq!(status, 401, "{body}");
    let again = flow_settled(&c.api.with_token(TOKEN)).await;
    assert_eq!(again["total"], 203);
    assert_eq!(again["edges"].as_array().map(Vec::len), Some(202));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_draws_a_flow_live() {
    use crate::browser::{find, screenshot, text_of};
    let ns = TestNs::new("webflow");
    let broker = Broker::connect(&ns).await.unwrap();
    declare_stages(&broker).await;
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let mut w = Writer::new(&broker);
    publish_flow(&mut w).await;
    release_d2(&mut w, &c.api).await;
    flow_settled(&c.api).await;

    let browser = spawn_browser(&ns).await.unwrap();
    let client = &browser.client;
    // The task list shows the held task with a flow badge that opens it.
    client.goto(&format!("{}/#task", c.api.base)).await.unwrap();
    find(client, "#task-list-status")
        .await
        .select_by_value("held")
        .await
        .unwrap();
    find(
        client,
        "tr.task-list-row[data-task-id='D'] a.flow-badge[data-task-id='D']",
    )
    .await
    .click()
    .await
    .unwrap();
    find(client, ".task-head[data-task-id='D'] .badge.oc-held").await;
    let facts = text_of(client, "#flow-facts .flow-after").await;
    assert!(facts.contains('P') && facts.contains("waiting"), "{facts}");

    // The parent's page: the whole flow drawn, one SVG node per task.
    client
        .goto(&format!("{}/#task/P", c.api.base))
        .await
        .unwrap();
    let count_js = "return document.querySelectorAll('#flow-svg .fnode').length;";
    eventually(Duration::from_secs(20), "203 nodes drawn", || async {
        let n = client.execute(count_js, vec![]).await?;
        anyhow::ensure!(n == serde_json::json!(203), "{n}");
        Ok(())
    })
    .await;
    // The counts by status, as the API gives them.
    let counts_js = "return Object.fromEntries([...document.querySelectorAll('#flow-counts .flow-count')].map(c => [c.dataset.status, Number(c.dataset.count)]));";
    let drawn_js = "const m = {}; for (const n of document.querySelectorAll('#flow-svg .fnode')) m[n.dataset.status] = (m[n.dataset.status] || 0) + 1; return m;";
    eventually(Duration::from_secs(10), "the counts", || async {
        let counts = client.execute(counts_js, vec![]).await?;
        anyhow::ensure!(counts == first_counts(), "{counts}");
        let drawn = client.execute(drawn_js, vec![]).await?;
        anyhow::ensure!(drawn == first_counts(), "{drawn}");
        Ok(())
    })
    .await;
    assert!(text_of(client, "#flow-total").await.contains("203"));
    assert!(
        client
            .find(fantoccini::Locator::Css("#flow-truncated"))
            .await
            .is_err()
    );
    // The held dependent, its dependency edge (dashed), the fan-out bundled
    // into a grid of 200.
    find(
        client,
        "#flow-svg g.fnode[data-task-id='D'][data-status='held']",
    )
    .await;
    find(
        client,
        "#flow-svg path.flow-edge.edge-after[data-from='P'][data-to='D']",
    )
    .await;
    find(
        client,
        "#flow-svg path.flow-edge.edge-after[data-from='P:199'][data-to='D2']",
    )
    .await;
    find(
        client,
        "#flow-svg path.edge-bundle[data-from='P'][data-count='200']",
    )
    .await;
    find(
        client,
        "#flow-svg g.fnode.current[data-task-id='P'][data-status='waiting']",
    )
    .await;
    let title_js = "return document.querySelector(\"#flow-svg g.fnode[data-task-id='P:0'] title\").textContent;";
    let title = client.execute(title_js, vec![]).await.unwrap();
    let title = title.as_str().unwrap();
    assert!(
        title.contains("P:0")
            && title.contains("status: running")
            && title.contains("stage: work")
            && title.contains("ETA"),
        "{title}"
    );
    screenshot(client, &ns, "flow.png").await;

    // Live: 40 more children succeed, the 20 running ones too; the counts
    // and the colours change without a reload.
    client
        .execute("window.__sameFlowPage = 1;", vec![])
        .await
        .unwrap();
    let events: Vec<Event> = (60..100).chain(0..20).flat_map(child_done).collect();
    w.send("agent-work", events).await;
    let later = serde_json::json!({
        "waiting": 1, "queued": 99, "succeeded": 100, "dead_lettered": 2, "held": 1,
    });
    eventually(Duration::from_secs(15), "the counts updated", || async {
        let counts = client.execute(counts_js, vec![]).await?;
        anyhow::ensure!(counts == later, "{counts}");
        let drawn = client.execute(drawn_js, vec![]).await?;
        anyhow::ensure!(drawn == later, "{drawn}");
        Ok(())
    })
    .await;
    find(client, "#flow-svg g.fnode.fs-succeeded[data-task-id='P:0']").await;
    let same = client
        .execute("return window.__sameFlowPage === 1;", vec![])
        .await
        .unwrap();
    assert_eq!(same, serde_json::json!(true), "updated without a reload");
    screenshot(client, &ns, "flow-live.png").await;

    // A click on a node opens its task.
    find(client, "#flow-svg a.fnode-link g.fnode[data-task-id='D2']")
        .await
        .click()
        .await
        .unwrap();
    find(client, ".task-head[data-task-id='D2']").await;
    // Why it was dead-lettered quotes the child's error: shown as text, the
    // script never runs.
    let why = text_of(client, "#flow-facts .flow-failed-text").await;
    assert!(why.contains("<script>window.__xss=1</script>"), "{why}");
    let ran = client
        .execute("return window.__xss === 1;", vec![])
        .await
        .unwrap();
    assert_eq!(ran, serde_json::json!(false), "the script did not run");
    // No node of the graph holds markup: every id and stage is text.
    let markup_js =
        "return document.querySelectorAll('#flow-svg script, #flow-facts script').length;";
    let n = client.execute(markup_js, vec![]).await.unwrap();
    assert_eq!(n, serde_json::json!(0));
    // The same flow, drawn from the dependent's page.
    eventually(
        Duration::from_secs(20),
        "D2's page draws the flow",
        || async {
            let n = client.execute(count_js, vec![]).await?;
            anyhow::ensure!(n == serde_json::json!(203), "{n}");
            Ok(())
        },
    )
    .await;
    find(client, "#flow-svg g.fnode.current[data-task-id='D2']").await;
    browser.client.clone().close().await.unwrap();
}
