//! The supervised worker process: restarted with backoff when it exits,
//! fails its health checks or lets a task time out, its tasks given back
//! to the queue rather than retried, its output kept for `Logs`.

use super::{hangs_once, setup, submit};
use guildhall_agent::{SimulateSpec, WorkerSpec};
use guildhall_proto::{Command, Event, WorkerResult};
use guildhall_tests::events::{abandoned, has, kinds_but_heartbeats, redelivered, task_story};
use guildhall_tests::inproc::{agent_config, exec, start_agent};
use guildhall_tests::{TestNs, free_port};
use std::time::Duration;

#[tokio::test]
async fn a_supervised_worker_is_restarted_and_its_output_kept() {
    let (ns, broker, mut events) = setup().await;
    let spec: SimulateSpec = "median=1ms".parse().unwrap();
    let config =
        agent_config(&ns, "super", None, WorkerSpec::Simulated(spec)).with_supervised(vec![
            "sh".into(),
            "-c".into(),
            "echo worker up; sleep 0.3; echo giving up >&2; exit 3".into(),
        ]);
    let agent = guildhall_agent::spawn(config);
    let id = agent.id().clone();
    let seen = events
        .until(&id, "two worker exits", |e| {
            e.iter().filter(|e| e.kind() == "worker_exited").count() >= 2
        })
        .await;
    let exits: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            Event::WorkerExited(w) => Some(w.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(exits[0].code, Some(3));
    assert_eq!(exits[0].restart_in_ms, Some(500));
    assert_eq!(exits[1].restarts, 1);
    assert_eq!(exits[1].restart_in_ms, Some(1000), "the backoff doubles");
    let Event::Hello(hello) = &seen[0] else {
        panic!("{seen:#?}")
    };
    assert!(hello.supervised);
    let reply = broker.command(&id, Command::Logs { lines: 10 }).await;
    assert!(reply.ok);
    assert!(reply.lines.iter().any(|l| l == "worker up"), "{reply:?}");
    assert!(reply.lines.iter().any(|l| l == "giving up"), "{reply:?}");
    assert!(broker.command(&id, Command::RestartWorker).await.ok);
    agent.stop_and_join().await.unwrap();
}

#[tokio::test]
async fn tasks_in_hand_go_back_to_the_queue_when_the_supervised_worker_exits() {
    let (ns, broker, mut events) = setup().await;
    let config = agent_config(&ns, "crashy", None, exec("sleep 10"))
        .with_supervised(vec!["sh".into(), "-c".into(), "sleep 1; exit 1".into()])
        .with_shutdown_timeout(Duration::from_millis(300));
    let agent = start_agent(&broker, config).await;
    let id = agent.id().clone();
    submit(&broker, "crashy", "C-1", b"x").await;
    let seen = events
        .until(
            &id,
            "the task to be redelivered after the worker exit",
            |e| {
                e.iter()
                    .any(|e| matches!(e, Event::TaskStarted(s) if s.redelivered))
            },
        )
        .await;
    let kinds = kinds_but_heartbeats(&seen);
    assert_eq!(kinds[..2], ["hello", "task_started"]);
    // Both follow the exit; which one is published first is a race.
    let mut middle = kinds[2..4].to_vec();
    middle.sort();
    assert_eq!(middle, ["task_abandoned", "worker_exited"]);
    assert_eq!(kinds[4], "task_started");
    let gave_up = abandoned(&seen);
    assert_eq!(
        (gave_up[0].reason.as_str(), gave_up[0].result),
        ("worker exited", WorkerResult::Unfinished)
    );
    assert!(
        !seen.iter().any(|e| e.kind() == "task_failed"),
        "not a failure: the task was given back, not retried"
    );
    let exit = agent.stop_and_join().await.unwrap();
    assert!(exit.requeued >= 1, "{exit:?}");
    assert_eq!(exit.failed, 0);
}

#[tokio::test]
async fn a_supervised_worker_that_stops_answering_its_health_url_is_restarted() {
    let (ns, broker, mut events) = setup().await;
    let port = free_port();
    let worker = WorkerSpec::Http {
        url: format!("http://127.0.0.1:{port}/work"),
    };
    let config = agent_config(&ns, "sick", Some("after"), worker)
        .with_task_timeout(Duration::from_secs(60))
        .with_supervised(vec![
            "python3".into(),
            "-c".into(),
            HANGING_HTTP_WORKER.into(),
            port.to_string(),
            ns.log_dir.join("posted-once").display().to_string(),
        ])
        // Three failures in a row, so that a slow answer on a busy
        // machine is not taken for a hang.
        .with_health_check(
            format!("http://127.0.0.1:{port}/health"),
            Duration::from_millis(300),
            3,
        );
    let agent = start_agent(&broker, config).await;
    let id = agent.id().clone();
    submit(&broker, "sick", "U-1", b"healed").await;
    let seen = events.until_step(&id, "U-1", "succeeded#1").await;
    assert_eq!(
        task_story(&seen, "U-1"),
        [
            "started#1",
            "abandoned#1:worker unhealthy",
            "started#1",
            "succeeded#1"
        ]
    );
    assert!(redelivered(&seen, "U-1"));
    let exit = seen
        .iter()
        .find_map(|e| match e {
            Event::WorkerExited(w) => Some(w.clone()),
            _ => None,
        })
        .expect("WorkerExited");
    assert_eq!(exit.signal, Some(15), "{exit:?}");
    assert!(exit.restart_in_ms.is_some());
    let after = broker
        .take(&broker.names.stage_queue(&TestNs::stage("after")))
        .await;
    assert_eq!(&after.delivery.data[..], b"healed");
    let exit = agent.stop_and_join().await.unwrap();
    assert_eq!((exit.done, exit.failed, exit.requeued), (1, 0, 1));
}

#[tokio::test]
async fn a_task_timeout_on_a_supervised_worker_restarts_it_instead_of_retrying() {
    let (ns, broker, mut events) = setup().await;
    let config = agent_config(
        &ns,
        "hung",
        None,
        exec(&hangs_once(&ns.log_dir.join("hung-once"), 30)),
    )
    .with_task_timeout(Duration::from_secs(1))
    .with_supervised(vec!["sleep".into(), "3600".into()]);
    let agent = start_agent(&broker, config).await;
    let id = agent.id().clone();
    submit(&broker, "hung", "T-1", b"x").await;
    let seen = events.until_step(&id, "T-1", "succeeded#1").await;
    assert_eq!(
        task_story(&seen, "T-1"),
        [
            "started#1",
            "abandoned#1:worker hung: task timeout",
            "started#1",
            "succeeded#1"
        ],
        "given back, not retried through the retry queue"
    );
    assert!(has(&seen, "worker_exited"));
    let exit = agent.stop_and_join().await.unwrap();
    assert_eq!((exit.done, exit.failed, exit.requeued), (1, 0, 1));
}

/// A worker for `python3 -c`: serves `/health`, and POSTs by echoing the
/// body, except the first POST ever (a marker file remembers), which hangs
/// the whole single-threaded server.
const HANGING_HTTP_WORKER: &str = r#"
import http.server, os, sys, time
port, marker = int(sys.argv[1]), sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def reply(self, body):
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.reply(b"ok")
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(3600)
        self.reply(body)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;
