//! Priorities on the real broker: a third-party producer (plain lapin, the
//! AMQP `priority` property) publishes a backlog of normal tasks and then a
//! few priority-9 tasks, which overtake it through the real agent binary and
//! a real HTTP worker; a priority outside 0-9 is dead-lettered with the
//! reason; a priority travels to the next stage's band.

use guildhall_proto::{AgentId, Band, Event};
use guildhall_tests::rig::{Rig, publish_plain, reasons};
use guildhall_tests::{TestNs, eventually};
use lapin::BasicProperties;
use std::time::Duration;

#[tokio::test]
async fn priority_9_tasks_published_after_a_backlog_overtake_it() {
    let ns = TestNs::new("prio");
    let rig = Rig::start(&ns, &[], &["--concurrency", "1"]).await;
    let broker = &rig.broker;
    let mut events = rig.events().await;
    let normal = 40;
    for i in 0..normal {
        publish_plain(
            broker,
            "work",
            &format!("N-{i}"),
            "sleep=60",
            BasicProperties::default(),
        )
        .await;
    }
    // Once the backlog is being worked on, the urgent ones come.
    let agent = AgentId::new("work-1").unwrap();
    let done = |e: &[Event], prefix: &str| {
        e.iter()
            .filter(
                |e| matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str().starts_with(prefix)),
            )
            .count()
    };
    events
        .until(&agent, "a first normal task done", |e| done(e, "N-") >= 1)
        .await;
    for i in 0..3 {
        publish_plain(
            broker,
            "work",
            &format!("U-{i}"),
            "sleep=60",
            BasicProperties::default().with_priority(9),
        )
        .await;
    }
    let all = events
        .until(&agent, "every task done", |e| {
            done(e, "N-") + done(e, "U-") == normal + 3
        })
        .await;
    let order: Vec<String> = all
        .iter()
        .filter_map(|e| match e {
            Event::TaskSucceeded(s) => Some(s.task_id.to_string()),
            _ => None,
        })
        .collect();
    for i in 0..3 {
        let at = order.iter().position(|t| *t == format!("U-{i}")).unwrap();
        let normals_after = order[at..].iter().filter(|t| t.starts_with("N-")).count();
        assert!(
            normals_after >= 25,
            "U-{i} should overtake the backlog, but only {normals_after} normal tasks finished after it: {order:?}"
        );
    }
    // Sorting a priority-9 task is reported, a default one is not.
    let queued: Vec<_> = all
        .iter()
        .filter_map(|e| match e {
            Event::TaskQueued(q) => Some((q.task_id.to_string(), q.priority.get())),
            _ => None,
        })
        .collect();
    assert_eq!(queued.len(), 3, "{queued:?}");
    assert!(queued.iter().all(|(id, p)| id.starts_with("U-") && *p == 9));
}

#[tokio::test]
async fn a_priority_outside_0_to_9_is_dead_lettered_with_the_reason_and_nothing_is_lost() {
    let ns = TestNs::new("prio-bad");
    let rig = Rig::start(&ns, &[], &[]).await;
    let (broker, worker) = (&rig.broker, &rig.worker);
    for (id, p) in [("B-10", 10u8), ("B-255", 255)] {
        publish_plain(
            broker,
            "work",
            id,
            "x",
            BasicProperties::default().with_priority(p),
        )
        .await;
    }
    publish_plain(
        broker,
        "work",
        "OK-5",
        "x",
        BasicProperties::default().with_priority(5),
    )
    .await;
    let dead = broker.names.dead_queue(&TestNs::stage("work"));
    let letters = eventually(Duration::from_secs(20), "two dead letters", || async {
        let (ready, _) = broker.probe(&dead).await.unwrap_or((0, 0));
        anyhow::ensure!(ready >= 2, "{ready} dead letters");
        broker.drain(&dead).await
    })
    .await;
    assert_eq!(letters.len(), 2);
    for (id, payload, headers) in &letters {
        assert!(id.starts_with("B-"), "{id}");
        assert_eq!(payload, "x");
        let (class, error) = reasons(headers);
        assert_eq!(class, "invalid_priority", "{id}");
        assert!(error.contains("outside 0-9"), "{error}");
    }
    // The good one was worked on.
    eventually(Duration::from_secs(20), "OK-5 processed", || async {
        let calls = worker.calls().await?;
        anyhow::ensure!(calls.keys().any(|k| k.starts_with("OK-5/")), "{calls:?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_priority_travels_to_the_next_stage_band() {
    let ns = TestNs::new("prio-fwd");
    let rig = Rig::start(&ns, &["out"], &["--next", "out"]).await;
    let broker = &rig.broker;
    publish_plain(
        broker,
        "work",
        "P-8",
        "x",
        BasicProperties::default().with_priority(8),
    )
    .await;
    let high = broker.names.band_queue(&TestNs::stage("out"), Band::High);
    let message = broker.take(&high).await;
    assert_eq!(*message.delivery.properties.priority(), Some(8));
    assert_eq!(
        message
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("P-8")
    );
}
