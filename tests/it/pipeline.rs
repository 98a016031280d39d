//! The whole system: a real coordinator, six real agents (HTTP and exec
//! workers), 510 tasks through three stages with planted failures.

use guildhall_tests::*;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

const TASKS: usize = 510;
/// Tasks that sleep at intake, so workers are seen busy.
const SLOW: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Through all three stages at the first try.
    Plain,
    /// Fails once at intake (HTTP 503), succeeds on attempt 2.
    RetriedAtIntake,
    /// Fails permanently at build (exec exit 65): dead-lettered there.
    DeadAtBuild,
    /// Fails at report every time; dead-lettered after 2 attempts.
    DeadAtReport,
}

fn fate(i: usize) -> Fate {
    match i {
        _ if i < SLOW => Fate::Plain,
        _ if i % 10 == 1 => Fate::RetriedAtIntake,
        _ if i % 25 == 2 => Fate::DeadAtBuild,
        _ if i % 50 == 3 => Fate::DeadAtReport,
        _ => Fate::Plain,
    }
}

fn payload(i: usize) -> String {
    let plan = match fate(i) {
        Fate::Plain if i < SLOW => "intake:sleep=2000",
        Fate::Plain => "",
        Fate::RetriedAtIntake => "intake:fail=once",
        Fate::DeadAtBuild => "build:fail=permanent",
        Fate::DeadAtReport => "report:fail=always",
    };
    format!("task-{i} {plan}")
}

fn id(i: usize) -> String {
    format!("P-{i:04}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_flow_through_three_stages_and_every_one_is_accounted_for() {
    let ns = TestNs::new("pipe");
    let broker = Broker::connect(&ns).await.unwrap();
    for stage in ["intake", "build", "report"] {
        broker.declare_stage(stage).await.unwrap();
    }
    let c = spawn_coordinator(&ns, &["--queue-poll", "200ms"])
        .await
        .unwrap();
    let intake_worker = spawn_http_worker(&ns, "intake-worker").await.unwrap();
    let report_workers = [
        spawn_http_worker(&ns, "report-worker-1").await.unwrap(),
        spawn_http_worker(&ns, "report-worker-2").await.unwrap(),
    ];
    let exec = exec_worker_command();
    let common = [
        "--heartbeat",
        "500ms",
        "--retry-delay",
        "100ms",
        "--retry-max-delay",
        "400ms",
    ];
    let mut agents = Vec::new();
    for n in 1..=2 {
        let mut args = vec![
            "--next",
            "build",
            "--concurrency",
            "2",
            "--worker-url",
            intake_worker.url.as_str(),
        ];
        args.extend(common);
        agents.push(
            spawn_agent(&ns, &format!("intake-{n}"), "intake", &args)
                .await
                .unwrap(),
        );
        let mut args = vec![
            "--next",
            "report",
            "--concurrency",
            "2",
            "--exec",
            exec.as_str(),
        ];
        args.extend(common);
        agents.push(
            spawn_agent(&ns, &format!("build-{n}"), "build", &args)
                .await
                .unwrap(),
        );
        let url = report_workers[n - 1].url.clone();
        let mut args = vec![
            "--concurrency",
            "4",
            "--max-attempts",
            "2",
            "--worker-url",
            url.as_str(),
        ];
        args.extend(common);
        agents.push(
            spawn_agent(&ns, &format!("report-{n}"), "report", &args)
                .await
                .unwrap(),
        );
    }
    eventually(Duration::from_secs(20), "six idle workers", || async {
        let w = c.api.get_ok("/api/workers").await?;
        let idle = w["workers"]
            .as_array()
            .map(|l| l.iter().filter(|w| w["status"] == "idle").count());
        anyhow::ensure!(idle == Some(6), "{w}");
        Ok(())
    })
    .await;

    // Submit through the API, 16 at a time.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let api = c.api.clone();
        set.spawn(async move {
            let body = serde_json::json!({"stage": "intake", "id": id(i), "payload": payload(i)});
            let (status, body) = api.post_raw("/api/tasks", &body.to_string()).await?;
            anyhow::ensure!(status == 201, "submit {i}: {status} {body}");
            Ok(())
        });
        if set.len() >= 16 {
            set.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }

    // While work is in flight: the slow tasks are in the intake workers' hands.
    let slow: BTreeSet<String> = (0..SLOW).map(id).collect();
    eventually(
        Duration::from_secs(15),
        "intake workers processing the slow tasks",
        || async {
            let w = c.api.get_ok("/api/workers").await?;
            let busy: Vec<&Value> = w["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| w["stage"] == "intake" && w["status"] == "processing")
                .collect();
            let held: BTreeSet<String> = busy
                .iter()
                .flat_map(|w| w["current_tasks"].as_array().into_iter().flatten())
                .filter_map(|t| t["task_id"].as_str().map(str::to_owned))
                .collect();
            anyhow::ensure!(
                busy.len() == 2 && !held.is_empty() && held.is_subset(&slow),
                "{w}"
            );
            for w in &busy {
                anyhow::ensure!(w["queue_size"].as_u64().is_some(), "no queue size: {w}");
            }
            Ok(())
        },
    )
    .await;

    // Every task ends where it was planted to.
    let views: HashMap<String, Value> =
        eventually(Duration::from_secs(120), "every task finished", || async {
            let mut views = HashMap::new();
            let mut pending = Vec::new();
            for i in 0..TASKS {
                let t = c.api.get_ok(&format!("/api/tasks/{}", id(i))).await?;
                let want = match fate(i) {
                    Fate::Plain | Fate::RetriedAtIntake => "succeeded",
                    Fate::DeadAtBuild | Fate::DeadAtReport => "dead_lettered",
                };
                if t["status"] != want {
                    pending.push(format!("{}: {} at {}", id(i), t["status"], t["stage"]));
                }
                views.insert(id(i), t);
            }
            anyhow::ensure!(
                pending.is_empty(),
                "{} not done, e.g. {:?}",
                pending.len(),
                &pending[..pending.len().min(5)]
            );
            Ok(views)
        })
        .await;

    // Each task's pipeline: one row per stage attempt, with the right worker and outcome.
    for i in 0..TASKS {
        let t = &views[&id(i)];
        let rows: Vec<(String, u64, String)> = t["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let worker = a["worker"].as_str().unwrap_or("-");
                let stage = a["stage"].as_str().unwrap();
                assert!(
                    worker.starts_with(&format!("{stage}-")),
                    "{} row {a} has worker {worker}",
                    id(i)
                );
                assert!(
                    a["started_at_ms"].is_u64() && a["finished_at_ms"].is_u64(),
                    "{a}"
                );
                (
                    stage.to_owned(),
                    a["attempt"].as_u64().unwrap(),
                    a["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let rows: Vec<(&str, u64, &str)> = rows
            .iter()
            .map(|(s, a, o)| (s.as_str(), *a, o.as_str()))
            .collect();
        let want: Vec<(&str, u64, &str)> = match fate(i) {
            Fate::Plain => vec![
                ("intake", 1, "succeeded"),
                ("build", 1, "succeeded"),
                ("report", 1, "succeeded"),
            ],
            Fate::RetriedAtIntake => vec![
                ("intake", 1, "retried"),
                ("intake", 2, "succeeded"),
                ("build", 1, "succeeded"),
                ("report", 1, "succeeded"),
            ],
            Fate::DeadAtBuild => vec![("intake", 1, "succeeded"), ("build", 1, "dead_lettered")],
            Fate::DeadAtReport => vec![
                ("intake", 1, "succeeded"),
                ("build", 1, "succeeded"),
                ("report", 1, "retried"),
                ("report", 2, "dead_lettered"),
            ],
        };
        assert_eq!(rows, want, "{}: {t}", id(i));
        if fate(i) == Fate::RetriedAtIntake {
            let err = &t["attempts"][0];
            assert_eq!(err["error_class"], "http_503", "{err}");
            assert!(
                err["error"]
                    .as_str()
                    .unwrap()
                    .contains("first attempt fails at intake"),
                "{err}"
            );
        }
        if fate(i) == Fate::DeadAtBuild {
            assert_eq!(t["attempts"][1]["error_class"], "exit_65");
        }
    }

    // The broker agrees: planted tasks sit in the dead-letter queues, the work queues are empty.
    let planted =
        |f: Fate| -> BTreeSet<String> { (0..TASKS).filter(|i| fate(*i) == f).map(id).collect() };
    let dead_build = broker
        .drain(&ns.names.dead_queue(&TestNs::stage("build")))
        .await
        .unwrap();
    let dead_report = broker
        .drain(&ns.names.dead_queue(&TestNs::stage("report")))
        .await
        .unwrap();
    assert_eq!(
        dead_build
            .iter()
            .map(|m| m.0.clone())
            .collect::<BTreeSet<_>>(),
        planted(Fate::DeadAtBuild)
    );
    assert_eq!(
        dead_report
            .iter()
            .map(|m| m.0.clone())
            .collect::<BTreeSet<_>>(),
        planted(Fate::DeadAtReport)
    );
    for (_, body, headers) in &dead_build {
        let err =
            guildhall_broker::task::header_str(headers, guildhall_proto::headers::amqp::LAST_ERROR)
                .unwrap_or_default();
        assert!(
            err.contains("permanent failure requested at build"),
            "{err}"
        );
        assert!(
            body.ends_with("@intake"),
            "the payload as build received it: {body}"
        );
    }
    for stage in ["intake", "build", "report"] {
        let left = broker
            .drain(&ns.names.stage_queue(&TestNs::stage(stage)))
            .await
            .unwrap();
        assert!(left.is_empty(), "{stage} still holds {} tasks", left.len());
    }

    // The report workers saw each surviving task; count any that ran twice.
    let mut report_calls: HashMap<String, u32> = HashMap::new();
    for w in &report_workers {
        for (k, n) in w.calls().await.unwrap() {
            *report_calls.entry(k).or_default() += n;
        }
    }
    let n_success = planted(Fate::Plain).len() + planted(Fate::RetriedAtIntake).len();
    let twice = report_calls.values().filter(|n| **n > 1).count();
    eprintln!(
        "pipeline: {TASKS} tasks, {n_success} completed, {} dead-lettered, {twice} stage attempts ran twice",
        TASKS - n_success
    );
    for i in (0..TASKS).filter(|i| matches!(fate(*i), Fate::Plain | Fate::RetriedAtIntake)) {
        assert!(
            report_calls.contains_key(&format!("{}/report/1", id(i))),
            "{} never reached report",
            id(i)
        );
    }

    // Workers' counters and the metrics match what happened.
    let retried_intake = planted(Fate::RetriedAtIntake).len() as f64;
    let dead_at_build = planted(Fate::DeadAtBuild).len() as f64;
    let dead_at_report = planted(Fate::DeadAtReport).len() as f64;
    let reached_report = TASKS as f64 - dead_at_build;
    let m = eventually(
        Duration::from_secs(15),
        "metrics and worker counters to settle",
        || async {
            let w = c.api.get_ok("/api/workers").await?;
            let list = w["workers"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(
                list.len() == 6 && list.iter().all(|w| w["status"] == "idle"),
                "{w}"
            );
            let sum = |stage: &str, field: &str| -> f64 {
                list.iter()
                    .filter(|w| w["stage"] == stage)
                    .map(|w| w[field].as_f64().unwrap_or(0.0))
                    .sum()
            };
            anyhow::ensure!(
                sum("intake", "done") == TASKS as f64 && sum("intake", "failed") == retried_intake,
                "intake counters: {w}"
            );
            anyhow::ensure!(
                sum("build", "failed") == dead_at_build,
                "build counters: {w}"
            );
            anyhow::ensure!(
                sum("report", "done") == reached_report - dead_at_report
                    && sum("report", "failed") == 2.0 * dead_at_report,
                "report counters: {w}"
            );
            let m = c.api.metrics().await?;
            let v = |name: &str, labels: &[(&str, &str)]| m.value(name, labels).unwrap_or(-1.0);
            let checks = [
                (
                    v(
                        "guildhall_tasks_total",
                        &[("stage", "intake"), ("outcome", "succeeded")],
                    ),
                    TASKS as f64,
                ),
                (
                    v(
                        "guildhall_tasks_total",
                        &[("stage", "intake"), ("outcome", "retried")],
                    ),
                    retried_intake,
                ),
                (
                    v(
                        "guildhall_tasks_total",
                        &[("stage", "build"), ("outcome", "dead_lettered")],
                    ),
                    dead_at_build,
                ),
                (
                    v(
                        "guildhall_tasks_total",
                        &[("stage", "report"), ("outcome", "retried")],
                    ),
                    dead_at_report,
                ),
                (
                    v(
                        "guildhall_tasks_total",
                        &[("stage", "report"), ("outcome", "dead_lettered")],
                    ),
                    dead_at_report,
                ),
                (v("guildhall_tasks_completed_total", &[]), n_success as f64),
                (
                    v("guildhall_tasks_submitted_total", &[("stage", "intake")]),
                    TASKS as f64,
                ),
                (
                    v("guildhall_tasks_started_total", &[("stage", "intake")]),
                    TASKS as f64 + retried_intake,
                ),
                (
                    v("guildhall_task_duration_seconds", &[("stage", "report")]),
                    reached_report + dead_at_report,
                ),
                (
                    v("guildhall_task_queue_wait_seconds", &[("stage", "build")]),
                    TASKS as f64,
                ),
                (
                    v("guildhall_pipeline_duration_seconds", &[]),
                    n_success as f64,
                ),
                (
                    v(
                        "guildhall_workers",
                        &[("stage", "build"), ("status", "idle")],
                    ),
                    2.0,
                ),
                (v("guildhall_workers", &[("status", "dead")]), 0.0),
                (
                    v(
                        "guildhall_stage_queue_messages",
                        &[("stage", "intake"), ("state", "ready")],
                    ),
                    0.0,
                ),
                (
                    v(
                        "guildhall_stage_queue_messages",
                        &[("stage", "report"), ("state", "unacked")],
                    ),
                    0.0,
                ),
                (v("guildhall_stage_consumers", &[("stage", "report")]), 2.0),
                (
                    v(
                        "guildhall_worker_tasks_total",
                        &[("worker", "intake-1"), ("outcome", "succeeded")],
                    ) + v(
                        "guildhall_worker_tasks_total",
                        &[("worker", "intake-2"), ("outcome", "succeeded")],
                    ),
                    TASKS as f64,
                ),
                (v("guildhall_worker_up", &[("stage", "report")]), 2.0),
            ];
            for (i, (got, want)) in checks.iter().enumerate() {
                anyhow::ensure!(got == want, "metrics check {i}: got {got}, want {want}");
            }
            Ok(m)
        },
    )
    .await;
    assert_eq!(
        m.value("guildhall_events_malformed_total", &[])
            .unwrap_or(0.0),
        0.0
    );
    assert!(
        m.value("guildhall_events_ingested_total", &[("kind", "heartbeat")])
            .unwrap()
            > 0.0
    );

    // Agents name their connections so the coordinator can find them.
    let management = guildhall_broker::Management::new(&management_url(), "/").unwrap();
    eventually(
        Duration::from_secs(20),
        "agents' connections listed by name",
        || async {
            let names: BTreeSet<String> = management
                .connections()
                .await?
                .into_iter()
                .filter_map(|c| c.user_provided_name)
                .collect();
            for a in &agents {
                let want = ns.names.agent_connection_name(&a.id.parse()?);
                anyhow::ensure!(names.contains(&want), "{want} not among {names:?}");
            }
            Ok(())
        },
    )
    .await;

    // ... and only in their own vhost: a coordinator of another vhost never
    // sees (nor closes) them, even with the same agent ids.
    let elsewhere = guildhall_broker::Management::new(&management_url(), "gh-other-vhost").unwrap();
    let foreign = elsewhere.connections().await.unwrap();
    assert!(
        foreign.iter().all(|c| !c
            .user_provided_name
            .as_deref()
            .unwrap_or("")
            .starts_with("guildhall-agent/")),
        "{foreign:?}"
    );

    // The stage view agrees, and the agents stop cleanly.
    let stages = c.api.get_ok("/api/stages").await.unwrap();
    let intake = stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "intake")
        .unwrap()
        .clone();
    assert_eq!(intake["next"], "build");
    assert_eq!(intake["retried"], retried_intake as u64);
    assert_eq!(intake["workers"]["alive"], 2);
    for mut a in agents {
        let status = a.proc.terminate(Duration::from_secs(20)).await.unwrap();
        assert!(
            status.success(),
            "{} exited with {status}: {}",
            a.id,
            a.proc.log_text()
        );
    }
    eventually(Duration::from_secs(10), "stopped workers", || async {
        let w = c.api.get_ok("/api/workers").await?;
        anyhow::ensure!(
            w["workers"]
                .as_array()
                .is_some_and(|l| l.iter().all(|w| w["status"] == "stopped")),
            "{w}"
        );
        Ok(())
    })
    .await;
}
