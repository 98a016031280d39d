//! Commands on the control exchange: pause, resume, drain, concurrency and
//! prefetch, and the replies that say what changed.

use super::{setup, submit};
use guildhall_agent::{SimulateSpec, WorkerSpec};
use guildhall_proto::{AgentState, Command, Event};
use guildhall_tests::events::has;
use guildhall_tests::inproc::{agent_config, exec, start_agent};
use guildhall_tests::{TestNs, eventually};
use std::time::Duration;

#[tokio::test]
async fn pause_stops_consumption_resume_restarts_it_and_drain_stops_the_agent() {
    let (ns, broker, mut events) = setup().await;
    let spec: SimulateSpec = "median=1ms,spread=0".parse().unwrap();
    let agent = start_agent(
        &broker,
        agent_config(&ns, "sim", Some("next"), WorkerSpec::Simulated(spec)),
    )
    .await;
    let id = agent.id().clone();
    let queue = broker.names.stage_queue(&TestNs::stage("sim"));

    let reply = broker.command(&id, Command::Pause).await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        broker.probe(&queue).await,
        Some((0, 0)),
        "no consumer while paused"
    );
    events
        .until(&id, "a paused heartbeat", |e| {
            e.iter()
                .any(|e| matches!(e, Event::Heartbeat(h) if h.state == AgentState::Paused))
        })
        .await;
    for i in 0..3 {
        submit(&broker, "sim", &format!("S-{i}"), b"x").await;
    }
    // Nothing consumes while paused: the tasks stay ready.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(broker.probe(&queue).await, Some((3, 0)));

    let reply = broker.command(&id, Command::Resume).await;
    assert!(reply.ok, "{reply:?}");
    let next = broker.names.stage_queue(&TestNs::stage("next"));
    eventually(
        Duration::from_secs(10),
        "3 results after resume",
        || async {
            {
                let got = broker.probe(&next).await;
                anyhow::ensure!(got == Some((3, 0)), "{got:?}");
                Ok(())
            }
        },
    )
    .await;

    let reply = broker
        .command(&id, Command::SetConcurrency { concurrency: 4 })
        .await;
    assert!(reply.ok, "{reply:?}");
    events
        .until(&id, "a heartbeat with concurrency 4", |e| {
            e.iter()
                .any(|e| matches!(e, Event::Heartbeat(h) if h.concurrency == 4))
        })
        .await;
    assert!(
        !broker
            .command(&id, Command::SetConcurrency { concurrency: 0 })
            .await
            .ok
    );
    let reply = broker
        .command(
            &id,
            Command::Assign {
                stage: TestNs::stage("other"),
                reason: "test".into(),
            },
        )
        .await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (false, "this agent cannot serve stage other (it serves sim)")
    );
    assert!(!broker.command(&id, Command::Logs { lines: 10 }).await.ok);

    let reply = broker.command(&id, Command::Drain).await;
    assert!(reply.ok, "{reply:?}");
    let exit = tokio::time::timeout(Duration::from_secs(10), agent.join())
        .await
        .expect("the agent stops after a drain")
        .unwrap();
    assert_eq!((exit.reason.as_str(), exit.done), ("drain", 3));
    let seen = events
        .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
        .await;
    let Some(Event::AgentStopping(stopping)) = seen.last() else {
        panic!("AgentStopping is the last event: {seen:#?}")
    };
    assert_eq!(stopping.reason, "drain");
}

#[tokio::test]
async fn set_concurrency_keeps_the_tasks_in_hand() {
    let (ns, broker, mut events) = setup().await;
    let agent = start_agent(
        &broker,
        agent_config(&ns, "wide", Some("out"), exec("sleep 0.5; cat")),
    )
    .await;
    let id = agent.id().clone();
    for i in 0..4 {
        submit(&broker, "wide", &format!("W-{i}"), b"x").await;
    }
    events
        .until(&id, "the first task to start", |e| has(e, "task_started"))
        .await;
    let reply = broker
        .command(&id, Command::SetConcurrency { concurrency: 3 })
        .await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (true, "concurrency 1 -> 3, prefetch 1 -> 3")
    );
    let seen = events
        .until(&id, "all four tasks to succeed", |e| {
            e.iter().filter(|e| e.kind() == "task_succeeded").count() == 4
        })
        .await;
    let most_in_hand = seen
        .iter()
        .filter_map(|e| match e {
            Event::Heartbeat(h) => Some(h.in_hand.len()),
            _ => None,
        })
        .max();
    assert!(
        most_in_hand > Some(1),
        "tasks ran side by side: {most_in_hand:?}"
    );
    let redelivered = seen
        .iter()
        .any(|e| matches!(e, Event::TaskStarted(s) if s.redelivered));
    assert!(!redelivered, "no task was given back");
    let exit = agent.stop_and_join().await.unwrap();
    assert_eq!((exit.done, exit.requeued), (4, 0));
}

#[tokio::test]
async fn set_prefetch_lets_the_agent_hold_more_tasks_than_its_concurrency() {
    let (ns, broker, mut events) = setup().await;
    let config = agent_config(&ns, "pf", None, exec("sleep 30"))
        .with_shutdown_timeout(Duration::from_millis(300));
    let agent = start_agent(&broker, config).await;
    let id = agent.id().clone();
    let queue = broker.names.stage_queue(&TestNs::stage("pf"));
    for i in 0..30 {
        submit(&broker, "pf", &format!("P-{i}"), b"x").await;
    }
    // Ready messages are the rest: exact and immediate, unlike the
    // management API's unacked counts. (The consumer count is not: a
    // quorum queue counts a cancelled consumer until its messages are
    // settled.)
    let held = |ready: u32| {
        let (broker, queue) = (&broker, &queue);
        async move {
            eventually(
                Duration::from_secs(10),
                &format!("{} tasks held by the agent", 30 - ready),
                || async {
                    {
                        let got = broker.probe(queue).await;
                        anyhow::ensure!(got.map(|p| p.0) == Some(ready), "{got:?}");
                        Ok(())
                    }
                },
            )
            .await
        }
    };
    held(29).await;
    // A last stage publishes no task: a probe measures the round trip.
    events
        .until(&id, "a heartbeat with the broker round trip", |e| {
            e.iter()
                .any(|e| matches!(e, Event::Heartbeat(h) if h.rtt_ms.is_some_and(|ms| ms < 10_000)))
        })
        .await;
    for bad in [0, 10_001] {
        let reply = broker
            .command(&id, Command::SetPrefetch { prefetch: bad })
            .await;
        assert!(!reply.ok, "{reply:?}");
    }
    let reply = broker
        .command(&id, Command::SetPrefetch { prefetch: 20 })
        .await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (true, "prefetch 1 -> 20")
    );
    // The new consumer holds 20 (its prefetch), the task in hand came
    // through the one it replaced.
    held(9).await;
    let seen = events
        .until(&id, "the first task to start", |e| has(e, "task_started"))
        .await;
    let started = seen.iter().filter(|e| e.kind() == "task_started").count();
    assert_eq!(started, 1, "20 held, one at the worker (concurrency 1)");

    let reply = broker
        .command(&id, Command::SetConcurrency { concurrency: 25 })
        .await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (true, "concurrency 1 -> 25, prefetch 20 -> 25")
    );
    // The 20 waiting went back; the new consumer took 25.
    held(4).await;
    let reply = broker
        .command(&id, Command::SetPrefetch { prefetch: 3 })
        .await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (
            true,
            "prefetch 25 -> 25 (3 asked, never below the concurrency)"
        )
    );
    let reply = broker
        .command(&id, Command::SetConcurrency { concurrency: 20 })
        .await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (true, "concurrency 25 -> 20, prefetch 25 -> 20")
    );
    let exit = agent.stop_and_join().await.unwrap();
    assert_eq!(exit.done, 0);
    let seen = events
        .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
        .await;
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::TaskAbandoned(a) if a.reason != "stop timeout")),
        "only the stop gave tasks back"
    );
    // The broker requeues a closed channel's deliveries and drops its
    // consumers on its own time, a moment after the agent has gone.
    eventually(Duration::from_secs(10), "all back in the queue", || async {
        {
            let got = broker.probe(&queue).await;
            anyhow::ensure!(got == Some((30, 0)), "{got:?}");
            Ok(())
        }
    })
    .await;
}
