//! Moving an agent between the stages it can serve (`Assign`), under load:
//! no task lost, none repeated, each finished as a task of the stage it
//! came from.

use super::{setup, submit};
use guildhall_agent::{SimulateSpec, WorkerSpec};
use guildhall_broker::{Publisher, TaskMeta, connect, now_ms};
use guildhall_proto::{AgentState, Command, Event, TaskId};
use guildhall_tests::events::{has, stage_in_hand};
use guildhall_tests::inproc::{agent_config, start_agent};
use guildhall_tests::{TestNs, amqp_url, eventually};
use std::time::Duration;

#[tokio::test]
async fn an_agent_moved_between_stages_under_load_loses_and_repeats_no_task() {
    const PER_STAGE: usize = 300;
    let (ns, broker, mut events) = setup().await;
    let spec: SimulateSpec = "median=100ms,spread=0".parse().unwrap();
    let routes = guildhall_agent::config::parse_stages("x>xout,y>yout").unwrap();
    // Heartbeats far apart: one right after a switch is the agent's own.
    let config = agent_config(&ns, "x", None, WorkerSpec::Simulated(spec.clone()))
        .with_stages(routes)
        .with_concurrency(8)
        .with_heartbeat(Duration::from_secs(5));
    let flexible = start_agent(&broker, config).await;
    let f = flexible.id().clone();
    let (qx, qy) = (
        broker.names.stage_queue(&TestNs::stage("x")),
        broker.names.stage_queue(&TestNs::stage("y")),
    );
    let assign = |stage: &str, reason: &str| Command::Assign {
        stage: TestNs::stage(stage),
        reason: reason.into(),
    };

    let reply = broker.command(&f, assign("z", "not mine")).await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (false, "this agent cannot serve stage z (it serves x, y)")
    );
    let reply = broker.command(&f, assign("x", "no-op")).await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (true, "already serving x")
    );
    for bad in [0, 10_001] {
        let reply = broker
            .command(&f, Command::SetPrefetch { prefetch: bad })
            .await;
        assert_eq!(
            (reply.ok, reply.message),
            (
                false,
                format!("prefetch must be between 1 and 10000 (got {bad})")
            )
        );
    }
    // Deliveries beyond the concurrency wait in the agent; each switch
    // gives them back to the queue.
    let reply = broker
        .command(&f, Command::SetPrefetch { prefetch: 16 })
        .await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (true, "prefetch 8 -> 16")
    );

    // A paused agent switches too, and stays paused.
    assert!(broker.command(&f, Command::Pause).await.ok);
    let reply = broker.command(&f, assign("y", "while paused")).await;
    assert_eq!(
        (reply.ok, reply.message.as_str()),
        (
            true,
            "serving y (was x); 0 task(s) in hand will finish as tasks of their stage"
        )
    );
    assert_eq!(broker.probe(&qx).await.map(|p| p.1), Some(0));
    assert_eq!(
        broker.probe(&qy).await.map(|p| p.1),
        Some(0),
        "still paused"
    );
    events
            .until(&f, "a paused heartbeat serving y", |e| {
                e.iter().any(|e| {
                    matches!(e, Event::Heartbeat(h) if h.state == AgentState::Paused && h.stage.as_str() == "y")
                })
            })
            .await;
    assert!(
        broker
            .command(&f, assign("x", "back before the load"))
            .await
            .ok
    );
    assert!(broker.command(&f, Command::Resume).await.ok);
    eventually(Duration::from_secs(10), "x consumed again", || async {
        {
            let got = broker.probe(&qx).await;
            anyhow::ensure!(got.map(|p| p.1) == Some(1), "{got:?}");
            Ok(())
        }
    })
    .await;

    // A steady stream to both stages, faster than the agent alone can take
    // it (80 tasks/s on one stage at a time): each switch finds tasks in
    // hand and deliveries waiting in the agent. It lasts (~3.6 s) beyond
    // the seven moves (~2.5 s): with 150 tasks a stage it ended first,
    // and a late move could find the stage it left already drained
    // (about 1 run in 3).
    let url = guildhall_broker::AmqpUrl::parse(&amqp_url()).unwrap();
    let names = broker.names.clone();
    let submitter = tokio::spawn(async move {
        let conn = connect(&url, "guildhall-agent-tests/submitter")
            .await
            .unwrap();
        let publisher = Publisher::open(&conn).await.unwrap();
        for i in 0..PER_STAGE {
            for (stage, prefix) in [("x", "X"), ("y", "Y")] {
                let id: TaskId = format!("{prefix}-{i}").parse().unwrap();
                let props = TaskMeta::submission(id, now_ms(), None).properties();
                publisher
                    .publish(&names.tasks_exchange(), stage, b"t", props)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(6)).await;
            }
        }
        let _ = conn.close(200, "submitted".into()).await;
    });

    // Moves back and forth, each while the agent holds tasks of the
    // stage it leaves (a few, so that some are still at the worker when
    // the command arrives).
    let moves = ["y", "x", "y", "x", "y", "x", "y"];
    let mut in_hand_at_move = Vec::new();
    let mut current = "x";
    let mut expected_moves = vec![
        ("x".to_owned(), "y".to_owned(), "while paused".to_owned()),
        ("y".into(), "x".into(), "back before the load".into()),
    ];
    for (i, to) in moves.into_iter().enumerate() {
        events
            .until(&f, &format!("tasks of {current} in hand"), |e| {
                stage_in_hand(e, current) >= 3
            })
            .await;
        let reason = format!("move {}: {current} -> {to}", i + 1);
        let reply = broker.command(&f, assign(to, &reason)).await;
        assert!(reply.ok, "{reply:?}");
        let prefix = format!("serving {to} (was {current}); ");
        assert!(reply.message.starts_with(&prefix), "{reply:?}");
        // What the agent held at the switch (the events the test reads
        // lag behind it: on a loaded machine the tasks seen in hand may
        // have finished by the time the command arrives).
        let held: usize = reply.message[prefix.len()..]
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no task count in {reply:?}"));
        in_hand_at_move.push(held);
        expected_moves.push((current.into(), to.into(), reason));
        current = to;
        // The dwell time, as the coordinator would keep it.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    submitter.await.unwrap();
    // An ordinary agent finishes x while the flexible one serves y.
    let plain = start_agent(
        &broker,
        agent_config(&ns, "x", Some("xout"), WorkerSpec::Simulated(spec)).with_concurrency(8),
    )
    .await;
    let g = plain.id().clone();
    let (xout, yout) = (
        broker.names.stage_queue(&TestNs::stage("xout")),
        broker.names.stage_queue(&TestNs::stage("yout")),
    );
    let per_stage = PER_STAGE as u32;
    eventually(Duration::from_secs(20), "every result", || async {
        let ready = |p: Option<(u32, u32)>| p.map(|(ready, _)| ready);
        let done = (
            ready(broker.probe(&xout).await),
            ready(broker.probe(&yout).await),
        );
        anyhow::ensure!(done == (Some(per_stage), Some(per_stage)), "{done:?}");
        Ok(())
    })
    .await;

    // After a reconnect the agent consumes the stage it serves now.
    broker.close_connection(&f).await;
    submit(&broker, "y", "Y-after", b"t").await;
    eventually(Duration::from_secs(15), "Y-after handed on", || async {
        {
            let got = broker.probe(&yout).await;
            anyhow::ensure!(got.map(|p| p.0) == Some(per_stage + 1), "{got:?}");
            Ok(())
        }
    })
    .await;

    plain.stop_and_join().await.unwrap();
    let exit = flexible.stop_and_join().await.unwrap();
    assert_eq!(exit.requeued, 0, "{exit:?}");
    assert_eq!(
        broker.probe(&xout).await,
        Some((per_stage, 0)),
        "nothing more"
    );
    assert_eq!(
        broker.probe(&yout).await,
        Some((per_stage + 1, 0)),
        "nothing more"
    );

    // Every task reached its stage's sink exactly once.
    for (queue, prefix, extra) in [(&xout, "X", None), (&yout, "Y", Some("Y-after"))] {
        let mut expected: Vec<String> = (0..PER_STAGE).map(|i| format!("{prefix}-{i}")).collect();
        expected.extend(extra.map(str::to_owned));
        expected.sort();
        // All of them are ready (checked above): a sink nobody consumes.
        let drained = broker.drain(queue).await.unwrap();
        let mut ids: Vec<String> = drained.into_iter().map(|(id, _, _)| id).collect();
        ids.sort();
        assert_eq!(ids, expected, "{queue}");
    }

    let fe = events
        .until(&f, "the flexible agent to stop", |e| {
            has(e, "agent_stopping")
        })
        .await;
    let ge = events
        .until(&g, "the plain agent to stop", |e| has(e, "agent_stopping"))
        .await;
    let Event::Hello(hello) = &fe[0] else {
        panic!("{:?}", fe[0])
    };
    let listed: Vec<&str> = hello.stages.iter().map(|s| s.as_str()).collect();
    assert_eq!(listed, ["x", "y"]);
    assert_eq!(
        (
            hello.stage.as_str(),
            hello.next.as_ref().map(|n| n.as_str())
        ),
        ("x", Some("xout"))
    );

    // No task ran twice, none was given up, each was reported under
    // its own stage with its own next stage.
    let all: Vec<&Event> = fe.iter().chain(&ge).collect();
    assert!(
        !all.iter()
            .any(|e| matches!(e, Event::TaskAbandoned(_) | Event::TaskFailed(_)))
    );
    for (stage, prefix) in [("x", "X"), ("y", "Y")] {
        for i in 0..PER_STAGE {
            let id = format!("{prefix}-{i}");
            let mine = |e: &&&Event| e.task_id().is_some_and(|t| t.as_str() == id);
            let started: Vec<_> = all
                .iter()
                .filter(mine)
                .filter_map(|e| match e {
                    Event::TaskStarted(s) => Some(s),
                    _ => None,
                })
                .collect();
            assert_eq!(started.len(), 1, "{id} started once: {started:?}");
            assert_eq!(started[0].stage.as_str(), stage);
            let succeeded: Vec<_> = all
                .iter()
                .filter(mine)
                .filter_map(|e| match e {
                    Event::TaskSucceeded(s) => Some(s),
                    _ => None,
                })
                .collect();
            assert_eq!(succeeded.len(), 1, "{id} succeeded once");
            assert_eq!(succeeded[0].stage.as_str(), stage);
            assert_eq!(
                succeeded[0].next.as_ref().map(|n| n.as_str()),
                Some(format!("{stage}out").as_str())
            );
        }
    }

    // The moves, in order, with their reasons.
    let moved: Vec<(usize, &guildhall_proto::Reassigned)> = fe
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            Event::Reassigned(r) => Some((i, r)),
            _ => None,
        })
        .collect();
    let seen_moves: Vec<(String, String, String)> = moved
        .iter()
        .map(|(_, r)| (r.from.to_string(), r.to.to_string(), r.reason.clone()))
        .collect();
    assert_eq!(seen_moves, expected_moves);
    let mut held_at_switch = Vec::new();
    for (n, (at, r)) in moved.iter().enumerate() {
        let end = moved.get(n + 1).map_or(fe.len(), |(i, _)| *i);
        let window = &fe[at + 1..end];
        let (from, to) = (r.from.as_str(), r.to.as_str());
        let next_of = |s: &str| Some(format!("{s}out"));
        // A heartbeat at once, naming the new stage; none stamped after
        // the switch names the old one.
        let beats: Vec<_> = window
            .iter()
            .filter_map(|e| match e {
                Event::Heartbeat(h) => Some(h),
                _ => None,
            })
            .collect();
        assert!(
            beats
                .iter()
                .any(|h| h.stage.as_str() == to
                    && h.next.as_ref().map(|s| s.to_string()) == next_of(to)),
            "a heartbeat serving {to} after {r:?}: {beats:?}"
        );
        for h in &beats {
            assert!(
                h.at_ms <= r.at_ms || h.stage.as_str() == to,
                "{h:?} after {r:?}"
            );
            assert!(
                h.in_hand.len() <= 8,
                "the concurrency spans both stages: {h:?}"
            );
        }
        if n < 2 {
            continue; // the moves before the load
        }
        // Tasks in hand at the switch (started before it in the agent's
        // own event order, not finished before it) finish after it, as
        // tasks of the stage they came from. Which ones those are is
        // read from the events: the count in the command's reply was
        // taken a moment before the switch, and a task can finish in
        // between (on a loaded machine, all of them).
        let before = &fe[..*at];
        let held: std::collections::BTreeSet<&str> = before
                .iter()
                .filter_map(|e| match e {
                    Event::TaskStarted(t) if t.stage.as_str() == from => Some(t.task_id.as_str()),
                    _ => None,
                })
                .filter(|id| {
                    !before.iter().any(|e| {
                        matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str() == *id && s.stage.as_str() == from)
                    })
                })
                .collect();
        for id in &held {
            let finished_old = fe[at + 1..].iter().any(|e| {
                matches!(e, Event::TaskSucceeded(s) if s.task_id.as_str() == *id
                        && s.stage.as_str() == from
                        && s.next.as_ref().map(|n| n.to_string()) == next_of(from)
                        && s.started_at_ms <= r.at_ms)
            });
            assert!(
                finished_old,
                "{id}, a task of {from} in hand at {r:?}, finished after it as a task of {from}"
            );
        }
        held_at_switch.push(held.len());
    }
    assert!(
        held_at_switch.iter().filter(|&&n| n > 0).count() >= 3,
        "most moves under load find tasks in hand: {held_at_switch:?} (the agent's own counts: {in_hand_at_move:?})"
    );
    let rtt = fe.iter().rev().find_map(|e| match e {
        Event::Heartbeat(h) => h.rtt_ms,
        _ => None,
    });
    assert!(rtt.is_some_and(|ms| (1..10_000).contains(&ms)), "{rtt:?}");
}
