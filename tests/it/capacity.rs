//! Capacity end to end: a real coordinator plans real stages, moves an agent
//! that can serve several stages to the overloaded one (without losing or
//! repeating a task), runs its scale actuators (a webhook and a command that
//! fails once and is retried), sizes the agents' prefetch, gives queued tasks
//! an ETA, and in a dry run only reports.

use guildhall_proto::Event;
use guildhall_tests::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// Tasks sent to the overloaded stage.
const TASKS: usize = 60;
/// Each takes this long at the worker.
const SERVICE_MS: u64 = 250;

fn id(i: usize) -> String {
    format!("C-{i:03}")
}

/// Flags that make the planner act within seconds instead of minutes.
const FAST_PLANNING: [&str; 12] = [
    "--queue-poll",
    "200ms",
    "--sync-period",
    "1s",
    "--wait-target",
    "1s",
    "--lead-time",
    "2s",
    "--min-dwell",
    "2s",
    "--scale-interval",
    "1s",
];

/// A coordinator with `extra` flags, an HTTP worker, a fixed agent on
/// `heavy` and a flexible agent that starts on `light` and can serve both;
/// waits until the coordinator sees both agents idle.
async fn fleet(ns: &TestNs, extra: &[&str]) -> (Coordinator, HttpWorker, Vec<Agent>) {
    let broker = Broker::connect(ns).await.unwrap();
    for stage in ["light", "heavy"] {
        broker.declare_stage(stage).await.unwrap();
    }
    let mut flags: Vec<&str> = FAST_PLANNING.to_vec();
    flags.extend(extra);
    let c = spawn_coordinator(ns, &flags).await.unwrap();
    let worker = spawn_http_worker(ns, "worker").await.unwrap();
    let common = ["--heartbeat", "500ms", "--worker-url", worker.url.as_str()];
    let fixed = spawn_agent(ns, "fixed", "heavy", &common).await.unwrap();
    let mut args = vec!["--stages", "light,heavy"];
    args.extend(common);
    let flexible = spawn_agent(ns, "flexible", "light", &args).await.unwrap();
    eventually(Duration::from_secs(20), "two idle workers", || async {
        let w = c.api.get_ok("/api/workers").await?;
        let list = w["workers"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(
            list.len() == 2 && list.iter().all(|w| w["status"] == "idle"),
            "{w}"
        );
        Ok(())
    })
    .await;
    (c, worker, vec![fixed, flexible])
}

/// Submits the load to `heavy` through the API.
async fn submit_heavy_load(api: &Api) {
    for i in 0..TASKS {
        let body = serde_json::json!({
            "stage": "heavy",
            "id": id(i),
            "payload": format!("heavy:sleep={SERVICE_MS}"),
        });
        let (status, body) = api.post_raw("/api/tasks", &body.to_string()).await.unwrap();
        assert_eq!(status, 201, "submit {i}: {body}");
    }
}

async fn worker_view(api: &Api, id: &str) -> anyhow::Result<Value> {
    api.get_ok(&format!("/api/workers/{id}")).await
}

fn stage_plan<'a>(scaling: &'a Value, stage: &str) -> anyhow::Result<&'a Value> {
    scaling["stages"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["stage"] == stage))
        .ok_or_else(|| anyhow::anyhow!("no plan for {stage}: {scaling}"))
}

/// `prefetch_count` of every consumer of `queue`, from the management API.
async fn consumer_prefetch(queue: &str) -> anyhow::Result<Vec<u64>> {
    let url = format!("{}/api/consumers/%2f", management_url());
    let consumers: Vec<Value> = reqwest::get(url).await?.error_for_status()?.json().await?;
    Ok(consumers
        .iter()
        .filter(|c| c["queue"]["name"] == queue)
        .filter_map(|c| c["prefetch_count"].as_u64())
        .collect())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flexible_agent_moves_to_the_overloaded_stage_and_the_actuators_run() {
    let ns = TestNs::new("cap");
    let hook = WebhookSink::start().await;
    let out = ns.log_dir.join("scaled.txt");
    let mark = ns.log_dir.join("failed-once");
    // Fails the first time (exit 3, "boom" on stderr), then records each call.
    let command = format!(
        "test -e {mark} || {{ touch {mark}; echo boom >&2; exit 3; }}; echo {{stage}}={{workers}} >> {out}",
        mark = mark.display(),
        out = out.display()
    );
    let (c, worker, mut agents) = fleet(
        &ns,
        &["--scale-webhook", &hook.url, "--scale-command", &command],
    )
    .await;
    let api = &c.api;
    let w = worker_view(api, "flexible").await.unwrap();
    assert_eq!(w["stages"], serde_json::json!(["light", "heavy"]), "{w}");
    assert_eq!(w["stage"], "light");

    submit_heavy_load(api).await;

    // A queued task has an ETA with a range, once service times are known.
    let last = id(TASKS - 1);
    eventually(
        Duration::from_secs(20),
        "an ETA for a queued task",
        || async {
            let t = api.get_ok(&format!("/api/tasks/{last}")).await?;
            let (Some(low), Some(mid), Some(high)) = (
                t["eta_low_in_ms"].as_u64(),
                t["eta_in_ms"].as_u64(),
                t["eta_high_in_ms"].as_u64(),
            ) else {
                anyhow::bail!("no ETA yet: {t}");
            };
            anyhow::ensure!(t["status"] == "queued", "{t}");
            anyhow::ensure!(low <= mid && mid <= high && mid >= SERVICE_MS, "{t}");
            // The task list carries the same range.
            let list = api
                .get_ok("/api/tasks?status=queued&stage=heavy&limit=1000")
                .await?;
            let item = list["tasks"]
                .as_array()
                .and_then(|l| l.iter().find(|t| t["id"] == last.as_str()))
                .ok_or_else(|| anyhow::anyhow!("{last} not listed: {list}"))?;
            anyhow::ensure!(
                item["eta_low_in_ms"].is_u64() && item["eta_high_in_ms"].is_u64(),
                "{item}"
            );
            Ok(())
        },
    )
    .await;

    // The flexible agent is moved to the overloaded stage, for a reason.
    let scaling = eventually(
        Duration::from_secs(30),
        "the flexible agent moved to heavy",
        || async {
            let w = worker_view(api, "flexible").await?;
            anyhow::ensure!(w["stage"] == "heavy", "still on {}", w["stage"]);
            let scaling = api.get_ok("/api/scaling").await?;
            let moves = scaling["moves"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(
                moves.iter().any(|m| m["worker"] == "flexible"
                    && m["from"] == "light"
                    && m["to"] == "heavy"
                    && m["reason"].as_str().is_some_and(|r| !r.is_empty())),
                "{scaling}"
            );
            Ok(scaling)
        },
    )
    .await;
    assert_eq!(scaling["wait_target_ms"], 1000, "{scaling}");
    let heavy = stage_plan(&scaling, "heavy").unwrap();
    for field in ["current_workers", "recommended_workers", "desired_workers"] {
        assert!(heavy[field].as_u64().is_some(), "{field}: {heavy}");
    }
    for bound in ["rate", "lower", "upper"] {
        assert!(heavy["forecast"][bound].as_f64().is_some(), "{heavy}");
    }
    assert!(heavy["reason"].as_str().is_some_and(|r| !r.is_empty()));

    // While the queue is long the planner wants more than the one fixed
    // worker, says so through both actuators, and marks the bottleneck.
    eventually(
        Duration::from_secs(30),
        "a scale-up through both actuators",
        || async {
            let scaling = api.get_ok("/api/scaling").await?;
            let heavy = stage_plan(&scaling, "heavy")?;
            let calls = hook.received.lock().map(|r| r.clone()).unwrap_or_default();
            anyhow::ensure!(
                calls
                    .iter()
                    .any(|b| b["stage"] == "heavy" && b["to"].as_u64() >= Some(2)),
                "webhook got {calls:?}; plan {heavy}"
            );
            let lines = read(&out);
            anyhow::ensure!(
                lines.lines().any(|l| l
                    .strip_prefix("heavy=")
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n >= 2)),
                "command wrote {lines:?}"
            );
            Ok(())
        },
    )
    .await;
    let log = c.proc.log_text();
    assert!(
        log.contains("scale command failed")
            && log.contains("boom")
            && log.contains("exit status: 3"),
        "the failure is logged with its status and output:\n{log}"
    );
    // An action is counted once it has returned, a moment after its
    // effects (the webhook's body, the command's output) were seen above.
    let m = eventually(
        Duration::from_secs(10),
        "the scale actions counted",
        || async {
            let m = api.metrics().await?;
            anyhow::ensure!(
                m.value("guildhall_scale_actions_total", &[("outcome", "done")]) >= Some(1.0),
                "no action counted done yet"
            );
            Ok(m)
        },
    )
    .await;
    assert!(
        m.value("guildhall_scale_actions_total", &[("outcome", "failed")]) >= Some(1.0),
        "failed action counted"
    );
    assert!(m.value("guildhall_scale_actions_total", &[("outcome", "done")]) >= Some(1.0));
    assert_eq!(
        m.value(
            "guildhall_worker_moves_total",
            &[("from", "light"), ("to", "heavy")]
        ),
        Some(1.0),
        "one move counted"
    );
    let heavy_label = [("stage", "heavy")];
    for name in [
        "guildhall_stage_recommended_workers",
        "guildhall_stage_arrival_rate",
        "guildhall_stage_utilisation",
        "guildhall_stage_backlog_age_seconds",
    ] {
        assert!(m.value(name, &heavy_label).is_some(), "{name} exported");
    }
    for bound in ["lower", "upper"] {
        assert!(
            m.value(
                "guildhall_stage_forecast_arrival_rate",
                &[("stage", "heavy"), ("bound", bound)]
            )
            .is_some(),
            "forecast {bound} exported"
        );
    }

    // Prefetch is sized from round trip and service time, and applied.
    // Tasks are consumed from the band queues (the intake's consumer is the
    // agent's sorter, with a prefetch of its own).
    let queue = ns
        .names
        .band_queue(&TestNs::stage("heavy"), guildhall_proto::Band::Low);
    eventually(
        Duration::from_secs(30),
        "prefetch asked and applied",
        || async {
            let asked = worker_view(api, "fixed").await?["prefetch_asked"].as_u64();
            let Some(asked) = asked else {
                anyhow::bail!("no prefetch asked yet");
            };
            anyhow::ensure!(asked >= 2, "asked {asked}");
            let applied = consumer_prefetch(&queue).await?;
            anyhow::ensure!(
                applied.contains(&asked),
                "asked {asked}, consumers {applied:?}"
            );
            Ok(())
        },
    )
    .await;

    // Every task succeeds, each ran exactly once: the move lost none and
    // repeated none.
    eventually(Duration::from_secs(90), "every task done", || async {
        let done = api.get_ok("/api/tasks?status=succeeded&limit=1000").await?;
        let n = done["tasks"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(n == TASKS, "{n} of {TASKS} succeeded");
        Ok(())
    })
    .await;
    let calls: HashMap<String, u32> = worker.calls().await.unwrap();
    for i in 0..TASKS {
        let key = format!("{}/heavy/1", id(i));
        assert_eq!(calls.get(&key), Some(&1), "{key}: {calls:?}");
    }
    assert_eq!(calls.len(), TASKS, "no second attempts: {calls:?}");
    // The agents stop (their heartbeats would keep the stream growing).
    for agent in &mut agents {
        let status = agent.proc.terminate(Duration::from_secs(10)).await.unwrap();
        assert!(status.success(), "{} exited with {status}", agent.id);
    }
    let events = Broker::connect(&ns)
        .await
        .unwrap()
        .read_events()
        .await
        .unwrap();
    assert!(
        events.iter().any(|e| e.sender.as_str() == "flexible"
            && e.events.iter().any(|e| matches!(e,
                Event::Reassigned(r) if r.from.as_str() == "light"
                    && r.to.as_str() == "heavy" && !r.reason.is_empty()))),
        "a Reassigned event with its reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_decisions_and_acts_on_none() {
    let ns = TestNs::new("capdry");
    let hook = WebhookSink::start().await;
    let out = ns.log_dir.join("scaled.txt");
    let command = format!("echo {{stage}}={{workers}} >> {}", out.display());
    let (c, _worker, _agents) = fleet(
        &ns,
        &[
            "--scale-dry-run",
            "--scale-webhook",
            &hook.url,
            "--scale-command",
            &command,
        ],
    )
    .await;
    let api = &c.api;
    submit_heavy_load(api).await;
    eventually(
        Duration::from_secs(30),
        "a move and a scale-up reported",
        || async {
            let scaling = api.get_ok("/api/scaling").await?;
            let moves = scaling["moves"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(moves.iter().any(|m| m["worker"] == "flexible"), "{scaling}");
            let m = api.metrics().await?;
            anyhow::ensure!(
                m.value("guildhall_scale_actions_total", &[("outcome", "dry_run")]) >= Some(1.0),
                "no dry-run action counted"
            );
            Ok(())
        },
    )
    .await;
    // Give a wrongly sent command time to land, then check nothing moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let w = worker_view(api, "flexible").await.unwrap();
    assert_eq!(w["stage"], "light", "a dry run moves no agent: {w}");
    // Tasks are consumed from the band queues (the intake's consumer is the
    // agent's sorter, with a prefetch of its own).
    let queue = ns
        .names
        .band_queue(&TestNs::stage("heavy"), guildhall_proto::Band::Low);
    // The management API lists consumers after its next statistics refresh.
    let prefetch = eventually(Duration::from_secs(15), "heavy's consumer", || async {
        let p = consumer_prefetch(&queue).await?;
        anyhow::ensure!(!p.is_empty(), "no consumer listed yet");
        Ok(p)
    })
    .await;
    assert_eq!(prefetch, vec![1], "a dry run sets no prefetch");
    assert!(!out.exists(), "a dry run runs no command: {}", read(&out));
    assert!(
        hook.received.lock().map(|r| r.is_empty()).unwrap_or(false),
        "a dry run calls no webhook"
    );
    assert!(c.proc.log_text().contains("would scale"));
}
