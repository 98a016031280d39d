//! The `guildhall` command line against the real broker and coordinator.

use guildhall_tests::*;
use std::process::Output;
use std::time::Duration;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed command: one line on stderr, the given status, no panic.
fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "more than one line: {err}"
    );
    assert!(err.starts_with("guildhall: error: "), "{err}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn submit_status_and_trace() {
    let ns = TestNs::new("cli");
    let broker = Broker::connect(&ns).await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let url = amqp_url();
    let common = ["--namespace", ns.name(), "--amqp-url", url.as_str()];

    // No queue for the stage yet: a clear error, nothing published.
    let mut args = vec!["submit"];
    args.extend(common);
    args.extend(["--stage", "build", "--payload", "x"]);
    let o = run_guildhall(&args).await;
    assert_one_line_error(&o, 1, "unknown stage 'build'");

    // --declare creates it; the id is printed.
    let mut args = vec!["submit"];
    args.extend(common);
    args.extend([
        "--stage",
        "build",
        "--id",
        "CLI-1",
        "--payload",
        "hello",
        "--declare",
    ]);
    let o = run_guildhall(&args).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "CLI-1\n");

    let payload_file = ns.log_dir.join("payload.bin");
    std::fs::write(&payload_file, b"from a file").unwrap();
    let at_file = format!("@{}", payload_file.display());
    let mut args = vec!["submit"];
    args.extend(common);
    args.extend(["--stage", "build", "--payload", at_file.as_str(), "--json"]);
    let o = run_guildhall(&args).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(json["stage"], "build");
    let msgs = broker
        .drain(&ns.names.stage_queue(&TestNs::stage("build")))
        .await
        .unwrap();
    let payloads: Vec<&str> = msgs.iter().map(|m| m.1.as_str()).collect();
    assert_eq!(payloads, ["hello", "from a file"]);

    // Bad flags: status 2.
    let mut args = vec!["submit"];
    args.extend(common);
    args.extend(["--stage", "no good"]);
    assert_one_line_error(&run_guildhall(&args).await, 2, "--stage");

    // status and trace read the coordinator.
    let api = c.api.base.as_str();
    eventually(Duration::from_secs(10), "the task in the API", || async {
        c.api.get_ok("/api/tasks/CLI-1").await
    })
    .await;
    let o = run_guildhall(&["status", "--api-url", api]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("STAGE") && text.contains("build"), "{text}");
    assert!(text.contains("no workers yet"), "{text}");
    let o = run_guildhall(&["status", "--api-url", api, "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(json["stages"][0]["name"], "build");

    let o = run_guildhall(&["trace", "--api-url", api, "CLI-1"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("task CLI-1: queued at build"), "{text}");
    assert!(text.contains("queued"), "{text}");
    let o = run_guildhall(&["trace", "--api-url", api, "--json", "CLI-1"]).await;
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(json["id"], "CLI-1");
    assert_one_line_error(
        &run_guildhall(&["trace", "--api-url", api, "NOPE-1"]).await,
        1,
        "404",
    );
}

#[tokio::test]
async fn submit_a_count_and_a_stream_of_tasks() {
    let ns = TestNs::new("cli");
    let broker = Broker::connect(&ns).await.unwrap();
    let url = amqp_url();
    let queue = format!("{}.stage.load", ns.name());
    let common = [
        "submit",
        "--namespace",
        ns.name(),
        "--amqp-url",
        url.as_str(),
        "--stage",
        "load",
        "--declare",
    ];

    // --count: back to back, a summary, each task with its own id.
    let mut args = common.to_vec();
    args.extend(["--count", "3", "--payload", "p"]);
    let o = run_guildhall(&args).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "submitted 3 tasks to load\n");
    let drained = broker.drain(&queue).await.unwrap();
    assert_eq!(drained.len(), 3);
    let ids: std::collections::HashSet<&String> = drained.iter().map(|(id, _, _)| id).collect();
    assert_eq!(ids.len(), 3, "{drained:?}");

    // --rate: a load generator that runs until SIGTERM, then says how many
    // it submitted; every one of them is on the queue.
    let mut args: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    args.extend(["--rate".into(), "50".into(), "--json".into()]);
    let (mut feeder, _) = spawn_logged(&ns, "loadgen", &bin("guildhall"), &args, &[], None)
        .await
        .unwrap();
    let management = guildhall_broker::Management::new(&management_url(), "/").unwrap();
    eventually(
        Duration::from_secs(30),
        "tasks arrive at a steady rate",
        || async {
            // `guildhall submit` publishes straight to the band.
            let band = ns
                .names
                .band_queue(&TestNs::stage("load"), guildhall_proto::Band::Low);
            let depth = management
                .queue(&band)
                .await?
                .map_or(0, |q| q.messages_ready);
            anyhow::ensure!(depth >= 5, "{depth} so far");
            Ok(())
        },
    )
    .await;
    let status = feeder.terminate(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "{}", feeder.log_text());
    let summary: serde_json::Value = eventually(Duration::from_secs(5), "the summary", || async {
        let line = feeder
            .log_text()
            .lines()
            .find_map(|l| l.strip_prefix("[out] ").map(str::to_owned))
            .ok_or_else(|| anyhow::anyhow!("no output yet"))?;
        Ok(serde_json::from_str(&line)?)
    })
    .await;
    let submitted = summary["submitted"].as_u64().unwrap();
    assert_eq!(summary["stage"], "load");
    assert_eq!(broker.drain(&queue).await.unwrap().len() as u64, submitted);

    // Out of range: one line, status 2.
    let mut args = common.to_vec();
    args.extend(["--rate", "0"]);
    assert_one_line_error(&run_guildhall(&args).await, 2, "--rate must be between");
}

#[tokio::test]
async fn failures_are_one_clear_line() {
    let dead_broker = "amqp://guest:guest@127.0.0.1:1/%2f";
    let o = run_guildhall(&[
        "serve",
        "--amqp-url",
        dead_broker,
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    assert_one_line_error(
        &o,
        1,
        "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f",
    );
    assert!(!stderr(&o).contains("guest:guest"), "password leaked");
    let o = run_guildhall(&["submit", "--amqp-url", dead_broker, "--stage", "a"]).await;
    assert_one_line_error(&o, 1, "cannot reach RabbitMQ");
    assert_one_line_error(
        &run_guildhall(&["status", "--api-url", "http://127.0.0.1:1"]).await,
        1,
        "cannot reach the coordinator at http://127.0.0.1:1",
    );
}

#[tokio::test]
async fn simulate_runs_offline_and_names_bad_input() {
    // A good run: every policy, as JSON, no broker involved.
    let o = run_guildhall(&["simulate", "--generate", "step", "--seed", "3", "--json"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let policies: Vec<&str> = report["policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["policy"].as_str())
        .collect();
    assert_eq!(policies, ["static", "reactive", "predictive"]);

    let dir = std::env::temp_dir().join(format!("guildhall-sim-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("bad.csv");
    std::fs::write(&trace, "# seconds,rate\n0,1.5\n60,lots\n").unwrap();
    let trace = trace.display().to_string();
    for (args, needle) in [
        (vec!["--trace", trace.as_str()], "bad.csv:3"),
        (vec!["--generate", "spike", "--policy", "magic"], "magic"),
        (vec!["--generate", "spike", "--wait-target", "0s"], "wait"),
        (
            vec!["--generate", "spike", "--stages", "a:median=1s;a:median=2s"],
            "a",
        ),
        (vec!["--generate", "sideways"], "sideways"),
    ] {
        let mut all = vec!["simulate"];
        all.extend(args.iter().copied());
        let o = run_guildhall(&all).await;
        assert_one_line_error(&o, 2, needle);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
