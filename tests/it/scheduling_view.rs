//! The coordinator's view of priorities and scheduled tasks (issue 18),
//! from `TaskQueued` events written to the stream and from messages in the
//! band queues, published with plain lapin.

use guildhall_proto::schedule::{Band, MAX_DELAY_MS, Priority};
use guildhall_proto::{AgentId, Envelope, Event, TaskId, TaskQueued, TaskSubmitted};
use guildhall_tests::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use std::time::Duration;

fn envelope(seq: u64, events: Vec<Event>) -> Vec<u8> {
    Envelope {
        sender: AgentId::new("producer-prio").unwrap(),
        incarnation: 7,
        seq,
        sent_at_ms: guildhall_broker::now_ms(),
        events,
    }
    .encode()
    .unwrap()
}

fn submitted(id: &str, stage: &str) -> Event {
    Event::TaskSubmitted(TaskSubmitted {
        at_ms: guildhall_broker::now_ms(),
        task_id: TaskId::new(id).unwrap(),
        stage: TestNs::stage(stage),
        payload_bytes: 1,
    })
}

fn queued(id: &str, stage: &str, priority: u8, due_at_ms: Option<u64>) -> Event {
    Event::TaskQueued(TaskQueued {
        at_ms: guildhall_broker::now_ms(),
        task_id: TaskId::new(id).unwrap(),
        stage: TestNs::stage(stage),
        priority: Priority::new(priority).unwrap(),
        due_at_ms,
    })
}

/// Declares `stage`'s band queue of `band` as the agents do (a quorum
/// queue) and puts `n` messages on it, with plain lapin.
async fn fill_band(broker: &Broker, stage: &str, band: Band, n: usize) {
    let name = broker.names.band_queue(&TestNs::stage(stage), band);
    for i in 0..n {
        broker
            .channel
            .basic_publish(
                "".into(),
                name.as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default()
                    .with_message_id(format!("band-{i}").into())
                    .with_priority(band.lowest().get())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn scheduled_tasks_priorities_and_band_depths_show_in_the_api_and_metrics() {
    let ns = TestNs::new("prioview");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("build").await.unwrap();
    fill_band(&broker, "build", Band::High, 2).await;
    fill_band(&broker, "build", Band::Low, 1).await;
    let c = spawn_coordinator(
        &ns,
        &["--queue-poll", "200ms", "--wait-target-band", "7-9=2s"],
    )
    .await
    .unwrap();
    let now = guildhall_broker::now_ms();
    let later = now + 3_600_000;
    broker
        .publish_raw_event(&envelope(
            1,
            vec![
                submitted("LATER", "build"),
                queued("LATER", "build", 8, Some(later)),
                submitted("SOON", "build"),
                queued("SOON", "build", 5, Some(now + 2_000)),
                submitted("URGENT", "build"),
                queued("URGENT", "build", 9, None),
                submitted("PLAIN", "build"),
            ],
        ))
        .await
        .unwrap();

    let task = eventually(Duration::from_secs(10), "the scheduled task", || async {
        c.api.get_ok("/api/tasks/LATER").await
    })
    .await;
    assert_eq!(task["status"], "scheduled", "{task}");
    assert_eq!(task["due_at_ms"], later);
    assert_eq!(task["priority"], 8);
    assert_eq!(task["band"], "7-9");
    assert_eq!(task["attempts"][0]["outcome"], "scheduled");
    assert_eq!(task["attempts"][0]["due_at_ms"], later);
    let urgent = c.api.get_ok("/api/tasks/URGENT").await.unwrap();
    assert_eq!(
        (urgent["status"].as_str(), urgent["priority"].as_u64()),
        (Some("queued"), Some(9))
    );
    let plain = c.api.get_ok("/api/tasks/PLAIN").await.unwrap();
    assert_eq!(
        (plain["priority"].as_u64(), plain["band"].as_str()),
        (Some(0), Some("0-3"))
    );
    assert!(plain["due_at_ms"].is_null());
    let listed = c.api.get_ok("/api/tasks?status=scheduled").await.unwrap();
    let ids: Vec<&str> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert!(ids.contains(&"LATER"), "{listed}");

    // The stage: scheduled count, band depths from the broker, band targets.
    let stage = eventually(Duration::from_secs(10), "band depths", || async {
        let v = c.api.get_ok("/api/stages").await?;
        let s = v["stages"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "build").cloned())
            .ok_or_else(|| anyhow::anyhow!("no stage: {v}"))?;
        anyhow::ensure!(s["bands"][0]["queue"]["ready"] == 2, "{s}");
        Ok(s)
    })
    .await;
    assert_eq!(stage["bands"][0]["priority"], "7-9");
    assert_eq!(stage["bands"][0]["wait_target_ms"], 2_000);
    assert_eq!(stage["bands"][0]["queued"], 1, "URGENT");
    assert_eq!(stage["bands"][2]["queue"]["ready"], 1);
    assert_eq!(stage["bands"][2]["wait_target_ms"], 30_000);
    assert_eq!(stage["intake"]["ready"], 0);
    // The stage's own counts add the intake and the bands.
    assert_eq!(stage["queue"]["ready"], 3);

    let m = eventually(Duration::from_secs(10), "band metrics", || async {
        let m = c.api.metrics().await?;
        let depth = m.value(
            "guildhall_stage_queue_depth",
            &[("stage", "build"), ("priority", "7-9")],
        );
        anyhow::ensure!(depth == Some(2.0), "depth {depth:?}");
        Ok(m)
    })
    .await;
    assert_eq!(
        m.value(
            "guildhall_stage_queue_depth",
            &[("stage", "build"), ("priority", "0-3")]
        ),
        Some(1.0)
    );

    // SOON falls due: queued, and one scheduled task is left.
    let s = eventually(Duration::from_secs(10), "SOON due", || async {
        let t = c.api.get_ok("/api/tasks/SOON").await?;
        anyhow::ensure!(t["status"] == "queued", "{t}");
        let v = c.api.get_ok("/api/stages").await?;
        Ok(v["stages"][0].clone())
    })
    .await;
    assert_eq!(s["scheduled"], 1, "{s}");
    assert_eq!(s["next_due_at_ms"], later);
    let m = c.api.metrics().await.unwrap();
    assert_eq!(
        m.value("guildhall_stage_scheduled_tasks", &[("stage", "build")]),
        Some(1.0)
    );
}

#[tokio::test]
async fn hostile_task_queued_events_and_flags_are_refused_or_clamped() {
    let ns = TestNs::new("priohostile");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("build").await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    // A due time far past the ladder's longest delay, a stage no one
    // declared, a priority for a task no one announced.
    broker
        .publish_raw_event(&envelope(
            1,
            vec![
                queued("FAR", "build", 3, Some(u64::MAX)),
                queued(
                    "ELSEWHERE",
                    "nowhere",
                    7,
                    Some(guildhall_broker::now_ms() + 60_000),
                ),
                queued("STRANGER", "build", 9, None),
            ],
        ))
        .await
        .unwrap();
    let far = eventually(Duration::from_secs(10), "FAR", || async {
        c.api.get_ok("/api/tasks/FAR").await
    })
    .await;
    assert_eq!(far["status"], "scheduled");
    let due = far["due_at_ms"].as_u64().unwrap();
    assert!(due <= guildhall_broker::now_ms() + MAX_DELAY_MS, "{far}");
    let m = c.api.metrics().await.unwrap();
    assert!(m.value("guildhall_events_clamped_total", &[("field", "time")]) >= Some(1.0));
    assert_eq!(
        c.api.get_ok("/api/tasks/ELSEWHERE").await.unwrap()["status"],
        "scheduled"
    );
    assert_eq!(
        c.api.get_ok("/api/tasks/STRANGER").await.unwrap()["priority"],
        9
    );
    // A filter of an unknown status names the valid ones, scheduled too.
    let (status, body) = c.api.get("/api/tasks?status=someday").await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("scheduled"),
        "{body}"
    );
    assert_eq!(c.api.get_ok("/healthz").await.unwrap()["status"], "ok");

    // A bad --wait-target-band: one line, exit 2, before anything starts.
    for (bad, needle) in [
        ("5=2s", "unknown priority band"),
        ("7-9=0s", "more than 0"),
        ("7-9", "BAND=DURATION"),
        ("7-9=soon", "--wait-target-band 7-9"),
    ] {
        let o =
            run_guildhall(&["serve", "--namespace", ns.name(), "--wait-target-band", bad]).await;
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{bad}: {err}");
        assert!(err.contains(needle), "{bad}: {err}");
    }
}

/// A restarted coordinator that loads its snapshot (and replays nothing
/// older) still shows the scheduled task, its priority and due time, and
/// the stage's scheduled count and band waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_and_scheduled_tasks_survive_a_coordinator_restart() {
    let ns = TestNs::new("priorestart");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("build").await.unwrap();
    let data = ns.log_dir.join("data");
    let dir = data.display().to_string();
    let flags = ["--data-dir", dir.as_str(), "--snapshot-interval", "1s"];
    let first = spawn_coordinator(&ns, &flags).await.unwrap();
    let later = guildhall_broker::now_ms() + 3_600_000;
    broker
        .publish_raw_event(&envelope(
            1,
            vec![
                submitted("KEPT", "build"),
                queued("KEPT", "build", 7, Some(later)),
            ],
        ))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "KEPT scheduled", || async {
        let t = first.api.get_ok("/api/tasks/KEPT").await?;
        anyhow::ensure!(t["status"] == "scheduled", "{t}");
        Ok(())
    })
    .await;
    let snapshot = data.join(format!("{}.snapshot", ns.name()));
    eventually(Duration::from_secs(10), "a snapshot", || async {
        anyhow::ensure!(snapshot.is_file());
        Ok(())
    })
    .await;
    let mut first = first;
    let status = first.proc.terminate(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}");

    let second = spawn_coordinator(&ns, &flags).await.unwrap();
    let log = second.proc.log_text();
    assert!(log.contains("loaded snapshot"), "{log}");
    let t = eventually(
        Duration::from_secs(10),
        "KEPT after the restart",
        || async { second.api.get_ok("/api/tasks/KEPT").await },
    )
    .await;
    assert_eq!(t["status"], "scheduled", "{t}");
    assert_eq!(t["priority"], 7);
    assert_eq!(t["due_at_ms"], later);
    let v = second.api.get_ok("/api/stages").await.unwrap();
    assert_eq!(v["stages"][0]["scheduled"], 1, "{v}");
}
