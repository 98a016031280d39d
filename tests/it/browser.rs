//! The dashboard in a real browser: headless Chromium through WebDriver,
//! against a real coordinator, real agents and workers on the real broker.
//! It sees a card per worker with its status, opens a task's stages, shows
//! what a worker wrote as "hidden: sign in" until the token is given (the
//! coordinator has one), then a worker's `<script>` error message as text,
//! pauses a worker with a click (the card and the API agree), and saves
//! screenshots under the test's output folder.

use fantoccini::{Client, Locator};
use guildhall_tests::*;
use std::time::Duration;

const TOKEN: &str = "browser-token-0123456789";

/// Waits for the element `css` and returns it.
pub(crate) async fn find(client: &Client, css: &str) -> fantoccini::elements::Element {
    eventually(Duration::from_secs(20), css, || async {
        Ok(client.find(Locator::Css(css)).await?)
    })
    .await
}

/// The text of the first element matching `css`, found and read again if
/// the page re-renders it in between (views refresh every second, which
/// leaves a found element stale).
pub(crate) async fn text_of(client: &Client, css: &str) -> String {
    eventually(Duration::from_secs(20), css, || async {
        Ok(client.find(Locator::Css(css)).await?.text().await?)
    })
    .await
}

pub(crate) async fn screenshot(client: &Client, ns: &TestNs, name: &str) {
    let png = client.screenshot().await.unwrap();
    let path = ns.log_dir.join(name);
    std::fs::write(&path, png).unwrap();
    eprintln!("browser: screenshot {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_and_its_buttons_act() {
    let ns = TestNs::new("web");
    let broker = Broker::connect(&ns).await.unwrap();
    for stage in ["fetch", "render"] {
        broker.declare_stage(stage).await.unwrap();
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let flags = [
        "--api-token",
        TOKEN,
        "--queue-poll",
        "300ms",
        "--listen",
        listen.as_str(),
    ];
    let mut c = spawn_coordinator(&ns, &flags).await.unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
    let common = ["--heartbeat", "500ms", "--worker-url", worker.url.as_str()];
    let mut agents = Vec::new();
    for (id, stage, next) in [
        ("fetch-1", "fetch", Some("render")),
        ("fetch-2", "fetch", Some("render")),
        ("render-1", "render", None),
    ] {
        let mut args = common.to_vec();
        if let Some(n) = next {
            args.extend(["--next", n]);
        }
        agents.push(spawn_agent(&ns, id, stage, &args).await.unwrap());
    }
    let api = c.api.with_token(TOKEN);
    for (id, payload) in [
        ("WEB-1", "hello"),
        (
            "WEB-XSS",
            "fetch:fail=permanent say=<script>window.__xss=1</script>",
        ),
    ] {
        let body = serde_json::json!({"stage": "fetch", "id": id, "payload": payload});
        let (status, answer) = api.post_raw("/api/tasks", &body.to_string()).await.unwrap();
        assert_eq!(status, 201, "{answer}");
    }
    eventually(Duration::from_secs(30), "both tasks finished", || async {
        for (id, want) in [("WEB-1", "succeeded"), ("WEB-XSS", "dead_lettered")] {
            let t = api.get_ok(&format!("/api/tasks/{id}")).await?;
            anyhow::ensure!(t["status"] == want, "{id}: {}", t["status"]);
        }
        Ok(())
    })
    .await;

    let browser = spawn_browser(&ns).await.unwrap();
    let client = &browser.client;
    client
        .goto(&format!("{}/#workers", c.api.base))
        .await
        .unwrap();

    // A card per worker, each with its status; the page is live.
    find(client, "#live[data-state='live']").await;
    for id in ["fetch-1", "fetch-2", "render-1"] {
        let card = find(
            client,
            &format!("article.worker-card[data-worker-id='{id}'][data-status='idle']"),
        )
        .await;
        let status = card.find(Locator::Css(".status")).await.unwrap();
        assert_eq!(status.text().await.unwrap(), "idle");
    }
    let cards = client
        .find_all(Locator::Css("article.worker-card"))
        .await
        .unwrap();
    assert_eq!(cards.len(), 3);
    screenshot(client, &ns, "workers.png").await;

    // A task's stages, as a timeline: searched by id, as a person would.
    find(client, "a[data-view='task']")
        .await
        .click()
        .await
        .unwrap();
    find(client, "#task-search")
        .await
        .send_keys("WEB-1")
        .await
        .unwrap();
    find(client, "#task-form button[type='submit']")
        .await
        .click()
        .await
        .unwrap();
    find(client, ".attempt-row[data-stage='render']").await;
    let rows = client.find_all(Locator::Css(".attempt-row")).await.unwrap();
    let mut stages = Vec::new();
    for row in &rows {
        stages.push(row.attr("data-stage").await.unwrap().unwrap_or_default());
    }
    assert_eq!(stages, ["fetch", "render"]);
    screenshot(client, &ns, "task.png").await;

    // Without the token, what the worker wrote (its error message, the
    // payload) is withheld: "hidden: sign in", which asks for the token.
    client
        .goto(&format!("{}/#task/WEB-XSS", c.api.base))
        .await
        .unwrap();
    let hidden = text_of(client, ".attempt-row[data-stage='fetch'] button.redacted").await;
    assert_eq!(hidden, "hidden: sign in");
    client
        .goto(&format!("{}/#errors", c.api.base))
        .await
        .unwrap();
    let sample = text_of(client, ".error-class .error-message").await;
    assert_eq!(sample, "hidden: sign in");
    client
        .goto(&format!("{}/#dead/fetch", c.api.base))
        .await
        .unwrap();
    let row = text_of(client, "tr.dead-row[data-task-id='WEB-XSS']").await;
    assert!(
        row.contains("hidden: sign in") && !row.contains("<script>"),
        "{row}"
    );
    find(
        client,
        "tr.dead-row[data-task-id='WEB-XSS'] button.redacted",
    )
    .await
    .click()
    .await
    .unwrap();
    find(client, "#token-dialog[open]").await;
    find(client, "#token-cancel").await.click().await.unwrap();
    screenshot(client, &ns, "dead-withheld.png").await;

    // Pause with a click: the page asks for the token once, the card turns
    // paused, and the API agrees.
    client
        .goto(&format!("{}/#workers", c.api.base))
        .await
        .unwrap();
    let pause = find(
        client,
        "article.worker-card[data-worker-id='fetch-2'] button[data-action='pause']",
    )
    .await;
    pause.click().await.unwrap();
    let input = find(client, "#token-input").await;
    input.send_keys(TOKEN).await.unwrap();
    find(client, "#token-form button[type='submit']")
        .await
        .click()
        .await
        .unwrap();
    find(
        client,
        "article.worker-card[data-worker-id='fetch-2'][data-status='paused']",
    )
    .await;
    let w = api.get_ok("/api/workers/fetch-2").await.unwrap();
    assert_eq!(w["status"], "paused");

    // With the token, a worker's error message with a script in it is shown
    // as text and never runs.
    client
        .goto(&format!("{}/#task/WEB-XSS", c.api.base))
        .await
        .unwrap();
    find(client, ".attempt-row[data-stage='fetch']").await;
    let text = client
        .find(Locator::Css("#task-result"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("<script>window.__xss=1</script>"),
        "the message is shown as text: {text}"
    );
    client
        .goto(&format!("{}/#errors", c.api.base))
        .await
        .unwrap();
    let sample = text_of(client, ".error-class .error-message").await;
    assert!(sample.contains("<script>"));
    let ran = client
        .execute("return window.__xss === 1;", vec![])
        .await
        .unwrap();
    assert_eq!(ran, serde_json::json!(false), "the script did not run");

    // Dead letters: the XSS task is listed (as text) at fetch.
    client
        .goto(&format!("{}/#dead/fetch", c.api.base))
        .await
        .unwrap();
    let row = text_of(client, "tr.dead-row[data-task-id='WEB-XSS']").await;
    assert!(row.contains("<script>"));

    // With the token kept, Replay all sends the dead letter back to its stage.
    client
        .goto(&format!("{}/#dead/fetch", c.api.base))
        .await
        .unwrap();
    find(client, "tr.dead-row[data-task-id='WEB-XSS']").await;
    find(client, "#dead-replay-all")
        .await
        .click()
        .await
        .unwrap();
    let result = find(client, "#dead-result").await;
    eventually(Duration::from_secs(10), "the replay answer", || async {
        let text = result.text().await?;
        anyhow::ensure!(text.contains("WEB-XSS"), "{text:?}");
        Ok(())
    })
    .await;
    eventually(Duration::from_secs(20), "WEB-XSS tried again", || async {
        let t = api.get_ok("/api/tasks/WEB-XSS").await?;
        let n = t["attempts"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(n >= 2, "{n} attempt rows");
        Ok(())
    })
    .await;
    screenshot(client, &ns, "workers-paused.png").await;

    // The pipeline, drawn by the page.
    client
        .goto(&format!("{}/#pipeline", c.api.base))
        .await
        .unwrap();
    find(client, "svg#pipeline-svg g.stage-node[data-stage='render']").await;
    find(client, "path.edge[data-from='fetch'][data-to='render']").await;
    screenshot(client, &ns, "pipeline.png").await;

    // The coordinator restarts: the page says so, then is live again by itself.
    c.proc.terminate(Duration::from_secs(10)).await.unwrap();
    find(client, "#live[data-state='reconnecting']").await;
    let c = spawn_coordinator(&ns, &flags).await.unwrap();
    find(client, "#live[data-state='live']").await;
    find(client, "svg#pipeline-svg g.stage-node[data-stage='render']").await;
    drop(c);

    browser.client.clone().close().await.unwrap();
}

/// Refreshes the README's screenshots from a running demo:
/// `cargo test -p guildhall-tests --test it browser::readme_screenshots -- --ignored`
/// writes `docs/dashboard-workers.png` and `docs/dashboard-pipeline.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes the README's screenshots; run by hand"]
async fn readme_screenshots() {
    let ns = TestNs::new("shots");
    let (_demo, api) = spawn_demo(
        &ns,
        &["--clean", "--duration", "120s", "--sync-period", "2s"],
    )
    .await
    .unwrap();
    let base = api.base.clone();
    // Let the pipeline fill up and the planner speak.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let browser = spawn_browser(&ns).await.unwrap();
    let client = &browser.client;
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    std::fs::create_dir_all(&docs).unwrap();
    for (view, css, file) in [
        ("workers", "article.worker-card", "dashboard-workers.png"),
        (
            "pipeline",
            "svg#pipeline-svg g.stage-node",
            "dashboard-pipeline.png",
        ),
    ] {
        client.goto(&format!("{base}/#{view}")).await.unwrap();
        find(client, "#live[data-state='live']").await;
        find(client, css).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let png = client.screenshot().await.unwrap();
        std::fs::write(docs.join(file), png).unwrap();
    }
    browser.client.clone().close().await.unwrap();
}

/// 500 workers (announced on the stream as agents would, with a long
/// heartbeat so they stay alive for the test): the page shows them all,
/// grouped by stage, and filtering and collapsing work. Prints how long the
/// first full render took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_workers_stay_usable() {
    use guildhall_proto::{AgentId, AgentState, Envelope, Event, Heartbeat, Hello, WorkerMode};
    const STAGES: usize = 5;
    const PER_STAGE: usize = 100;
    let ns = TestNs::new("web500");
    let broker = Broker::connect(&ns).await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let now = guildhall_broker::now_ms();
    for s in 0..STAGES {
        let stage = TestNs::stage(&format!("stage{s}"));
        for w in 0..PER_STAGE {
            let id = format!("s{s}-worker-{w:03}");
            let hello = Hello {
                at_ms: now,
                version: "0.1.0".into(),
                stage: stage.clone(),
                next: None,
                stages: vec![stage.clone()],
                concurrency: 2,
                heartbeat_ms: 600_000,
                hostname: format!("host-{}", w % 17),
                pid: 1000 + w as u32,
                mode: WorkerMode::Http {
                    url: "http://127.0.0.1:1/".into(),
                },
                supervised: false,
            };
            let heartbeat = Heartbeat {
                at_ms: now,
                version: "0.1.0".into(),
                stage: stage.clone(),
                next: None,
                state: if w % 10 == 0 {
                    AgentState::Paused
                } else {
                    AgentState::Idle
                },
                concurrency: 2,
                heartbeat_ms: 600_000,
                in_hand: vec![],
                done: w as u64,
                failed: 0,
                worker: None,
                agent: None,
                hostname: format!("host-{}", w % 17),
                worker_restarts: 0,
                rtt_ms: Some(1),
            };
            let envelope = Envelope {
                sender: AgentId::new(id).unwrap(),
                incarnation: 1,
                seq: 1,
                sent_at_ms: now,
                events: vec![
                    Event::Hello(Box::new(hello)),
                    Event::Heartbeat(Box::new(heartbeat)),
                ],
            };
            broker
                .publish_raw_event(&envelope.encode().unwrap())
                .await
                .unwrap();
        }
    }
    let total = STAGES * PER_STAGE;
    eventually(Duration::from_secs(30), "500 workers known", || async {
        let w = c.api.get_ok("/api/workers").await?;
        let n = w["workers"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(n == total, "{n}");
        Ok(())
    })
    .await;

    let browser = spawn_browser(&ns).await.unwrap();
    let client = &browser.client;
    let started = std::time::Instant::now();
    client
        .goto(&format!("{}/#workers", c.api.base))
        .await
        .unwrap();
    let count_js = "return document.querySelectorAll('article.worker-card').length;";
    eventually(Duration::from_secs(30), "500 cards", || async {
        let n = client.execute(count_js, vec![]).await?;
        anyhow::ensure!(n == serde_json::json!(total), "{n}");
        Ok(())
    })
    .await;
    eprintln!(
        "browser: 500 worker cards rendered {} ms after navigation",
        started.elapsed().as_millis()
    );
    let groups = client
        .find_all(Locator::Css("section.stage-group"))
        .await
        .unwrap();
    assert_eq!(groups.len(), STAGES);
    screenshot(client, &ns, "workers-500.png").await;

    // Filter by text: only the matching cards stay visible.
    let visible_js = "return [...document.querySelectorAll('article.worker-card')].filter(c => !c.hidden && c.offsetParent !== null).length;";
    let filter = find(client, "#worker-filter").await;
    filter.send_keys("s3-worker-04").await.unwrap();
    eventually(Duration::from_secs(10), "10 cards match", || async {
        let n = client.execute(visible_js, vec![]).await?;
        anyhow::ensure!(n == serde_json::json!(10), "{n}");
        Ok(())
    })
    .await;
    // Backspaces (WebDriver's key U+E003), so the page sees input events.
    filter
        .send_keys(&"\u{E003}".repeat("s3-worker-04".len()))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "all cards again", || async {
        let n = client.execute(visible_js, vec![]).await?;
        anyhow::ensure!(n == serde_json::json!(total), "{n}");
        Ok(())
    })
    .await;

    // Collapse one stage's group.
    let toggle = find(
        client,
        "section.stage-group[data-stage='stage0'] .group-toggle",
    )
    .await;
    toggle.click().await.unwrap();
    eventually(Duration::from_secs(10), "stage0 collapsed", || async {
        let v = toggle.attr("aria-expanded").await?;
        anyhow::ensure!(v.as_deref() == Some("false"), "{v:?}");
        Ok(())
    })
    .await;
    browser.client.clone().close().await.unwrap();
}

/// Priorities and scheduled tasks (issue 18), from `TaskQueued` events a
/// producer wrote to the stream: a scheduled task's page shows its state,
/// due time and priority; the task list shows it; the pipeline view shows
/// the stage's scheduled count and bands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_priorities_and_scheduled_tasks() {
    use guildhall_proto::schedule::Priority;
    use guildhall_proto::{AgentId, Envelope, Event, TaskId, TaskQueued, TaskSubmitted};
    let ns = TestNs::new("webprio");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("build").await.unwrap();
    let c = spawn_coordinator(&ns, &["--queue-poll", "300ms"])
        .await
        .unwrap();
    let now = guildhall_broker::now_ms();
    let later = now + 3_600_000;
    let at = |id: &str, priority: u8, due: Option<u64>| {
        [
            Event::TaskSubmitted(TaskSubmitted {
                at_ms: now,
                task_id: TaskId::new(id).unwrap(),
                stage: TestNs::stage("build"),
                payload_bytes: 1,
            }),
            Event::TaskQueued(TaskQueued {
                at_ms: now,
                task_id: TaskId::new(id).unwrap(),
                stage: TestNs::stage("build"),
                priority: Priority::new(priority).unwrap(),
                due_at_ms: due,
            }),
        ]
    };
    let mut events: Vec<Event> = at("WEB-LATER", 8, Some(later)).into();
    events.extend(at("WEB-URGENT", 9, None));
    let envelope = Envelope {
        sender: AgentId::new("producer-web").unwrap(),
        incarnation: 1,
        seq: 1,
        sent_at_ms: now,
        events,
    };
    broker
        .publish_raw_event(&envelope.encode().unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the task in the API", || async {
        c.api.get_ok("/api/tasks/WEB-LATER").await
    })
    .await;

    let browser = spawn_browser(&ns).await.unwrap();
    let client = &browser.client;
    client
        .goto(&format!("{}/#task/WEB-LATER", c.api.base))
        .await
        .unwrap();
    assert_eq!(
        text_of(client, ".task-head .task-status").await,
        "scheduled"
    );
    assert_eq!(
        text_of(client, ".task-head .badge.prio[data-priority='8']").await,
        "priority 8"
    );
    let due = find(client, ".facts .due").await;
    assert_eq!(
        due.attr("data-due-at").await.unwrap().as_deref(),
        Some(later.to_string().as_str())
    );
    assert!(
        due.text().await.unwrap().contains("in 59m") || due.text().await.unwrap().contains("in 1h")
    );
    assert_eq!(
        text_of(client, ".attempt-row[data-outcome='scheduled'] .badge").await,
        "scheduled"
    );
    // The task list, scheduled first: the task, its priority, its due time.
    let row = text_of(
        client,
        "tr.task-list-row[data-task-id='WEB-LATER'][data-status='scheduled']",
    )
    .await;
    assert!(row.contains("scheduled") && row.contains('8'), "{row}");
    screenshot(client, &ns, "task-scheduled.png").await;
    // Queued tasks by priority: the urgent one, priority 9.
    find(client, "#task-list-status")
        .await
        .select_by_value("queued")
        .await
        .unwrap();
    let urgent = text_of(
        client,
        "tr.task-list-row[data-task-id='WEB-URGENT'][data-priority='9']",
    )
    .await;
    assert!(urgent.contains("queued"), "{urgent}");
    // The pipeline: the stage's bands and its scheduled count.
    client
        .goto(&format!("{}/#pipeline", c.api.base))
        .await
        .unwrap();
    assert_eq!(
        text_of(
            client,
            "#bands-table tr.band-row[data-stage='build'] .scheduled-count"
        )
        .await,
        "1"
    );
    // WEB-URGENT is the one task known queued in band 7-9.
    let high = text_of(
        client,
        "#bands-table tr.band-row[data-stage='build'] .band-cell[data-band='7-9']",
    )
    .await;
    assert!(high.contains("/ 1 "), "{high}");
    screenshot(client, &ns, "pipeline-bands.png").await;
    browser.client.clone().close().await.unwrap();
}

/// Cancelling from the dashboard (issue 18): a task's page has a Cancel
/// button with a confirmation, and a bulk cancel counts (dry run) before
/// it cancels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_cancelled_from_the_dashboard() {
    let ns = TestNs::new("webcancel");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let worker = spawn_http_worker(&ns, "worker").await.unwrap();
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
    let api = &c.api;
    let submit = |id: &'static str, payload: &'static str| async move {
        let body = serde_json::json!({"stage": "work", "id": id, "payload": payload});
        let (status, body) = api.post_raw("/api/tasks", &body.to_string()).await.unwrap();
        assert!(status < 300, "{body}");
    };
    let status_of = |id: &'static str| async move {
        api.get_ok(&format!("/api/tasks/{id}"))
            .await
            .map(|t| t["status"].clone())
    };
    // The tasks wait behind a long one: the cancel is requested (agents
    // hold the id), and settles when they are delivered.
    let cancel_of = |id: &'static str| async move {
        api.get_ok(&format!("/api/tasks/{id}"))
            .await
            .map(|t| t["cancel"]["state"].clone())
    };
    submit("web-block", "sleep=60000").await;
    eventually(Duration::from_secs(20), "the blocker runs", || async {
        anyhow::ensure!(status_of("web-block").await? == "running");
        Ok(())
    })
    .await;
    submit("web-q", "sleep=10").await;
    for id in ["bulkw-1", "bulkw-2", "bulkw-3"] {
        submit(id, "sleep=10").await;
    }

    let browser = spawn_browser(&ns).await.unwrap();
    let client = &browser.client;
    client
        .goto(&format!("{}/#task/web-q", api.base))
        .await
        .unwrap();
    find(client, "#task-cancel").await.click().await.unwrap();
    find(client, "#task-cancel-confirm")
        .await
        .click()
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "web-q cancel requested",
        || async {
            anyhow::ensure!(cancel_of("web-q").await? == "requested");
            Ok(())
        },
    )
    .await;
    eventually(Duration::from_secs(20), "the page says so", || async {
        let text = client
            .find(Locator::Css(".cancel-state"))
            .await?
            .text()
            .await?;
        anyhow::ensure!(text.contains("cancel requested by api"), "{text}");
        Ok(())
    })
    .await;
    screenshot(client, &ns, "task-cancelled.png").await;

    // Bulk: count first, then cancel.
    find(client, "#bulk-prefix")
        .await
        .send_keys("bulkw-")
        .await
        .unwrap();
    find(client, "#bulk-count").await.click().await.unwrap();
    let counted = text_of(client, "#bulk-result").await;
    let counted = if counted.contains("match") {
        counted
    } else {
        eventually(Duration::from_secs(10), "the count", || async {
            let t = client
                .find(Locator::Css("#bulk-result"))
                .await?
                .text()
                .await?;
            anyhow::ensure!(t.contains("match"), "{t}");
            Ok(t)
        })
        .await
    };
    assert!(counted.contains("3 task(s) match"), "{counted}");
    assert_eq!(
        status_of("bulkw-1").await.unwrap(),
        "queued",
        "a dry run cancels nothing"
    );
    find(client, "#bulk-confirm").await.click().await.unwrap();
    eventually(Duration::from_secs(10), "the bulk answer", || async {
        let t = client
            .find(Locator::Css("#bulk-result"))
            .await?
            .text()
            .await?;
        anyhow::ensure!(t.contains("3 of 3 task(s) cancelled"), "{t}");
        Ok(())
    })
    .await;
    for id in ["bulkw-1", "bulkw-2", "bulkw-3"] {
        eventually(Duration::from_secs(30), id, || async {
            anyhow::ensure!(cancel_of(id).await? == "requested");
            Ok(())
        })
        .await;
    }
    drop(broker);
}
