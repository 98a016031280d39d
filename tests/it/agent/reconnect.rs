//! Lost connections: the broker closes an agent's connection (as the
//! coordinator does to a frozen agent); the tasks in hand are given back,
//! the agent reconnects, and its events get through, in order. A refusal no
//! retry can fix ends the run.

use super::{hangs_once, message_id, setup, start_binary, submit, terminate_cleanly};
use guildhall_broker::{EventPublisher, EventPublisherConfig, Publisher, connect, now_ms};
use guildhall_proto::{AgentId, Event, Marker, WorkerResult};
use guildhall_tests::events::{abandoned, has, redelivered, task_story};
use guildhall_tests::inproc::{agent_config, exec, start_agent};
use guildhall_tests::{TestNs, amqp_url, eventually};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test]
async fn a_connection_closed_by_the_broker_gives_the_task_back_and_the_agent_reconnects() {
    let (ns, broker, mut events) = setup().await;
    let agent = start_agent(
        &broker,
        agent_config(
            &ns,
            "cut",
            Some("after"),
            exec(&hangs_once(&ns.log_dir.join("hung-once"), 30)),
        ),
    )
    .await;
    let id = agent.id().clone();
    broker.wait_for_connection(&id).await;
    submit(&broker, "cut", "R-1", b"once").await;
    events
        .until(&id, "the task to start", |e| has(e, "task_started"))
        .await;
    broker.close_connection(&id).await;

    // Take the agent's command queue name as soon as the broker dropped
    // it with the old connection: reconnect attempts fail on it
    // (RESOURCE_LOCKED, retried) while events pile up in the agent.
    let control_queue = broker.names.agent_control_queue(&id);
    let outage = match broker.hold_exclusive_queue(&control_queue).await {
        Some(ch) => {
            let from_ms = now_ms();
            // The outage being simulated, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            ch.queue_delete(control_queue.as_str().into(), Default::default())
                .await
                .unwrap();
            Some((from_ms, now_ms()))
        }
        None => None,
    };

    let seen = events.until_step(&id, "R-1", "succeeded#1").await;
    assert_eq!(
        task_story(&seen, "R-1"),
        [
            "started#1",
            "abandoned#1:connection lost",
            "started#1",
            "succeeded#1"
        ]
    );
    assert!(redelivered(&seen, "R-1"));
    let gave_up = abandoned(&seen);
    assert_eq!(gave_up[0].result, WorkerResult::Unfinished);
    assert_eq!(
        seen.iter().filter(|e| e.kind() == "hello").count(),
        1,
        "Hello only at the start of the run"
    );

    // Handed on exactly once: the abandoned attempt published nothing.
    let after = broker.names.stage_queue(&TestNs::stage("after"));
    assert_eq!(broker.probe(&after).await, Some((1, 0)));
    let message = broker.take(&after).await;
    assert_eq!(
        (message_id(&message).as_str(), &message.delivery.data[..]),
        ("R-1", &b"once"[..])
    );

    // Heartbeats carry on after the reconnect, in sequence, and those
    // emitted while disconnected arrived too.
    let reconnected_at = gave_up[0].at_ms;
    let seen = events
        .until(&id, "heartbeats after the reconnect", |e| {
            e.iter()
                .filter(|e| matches!(e, Event::Heartbeat(h) if h.at_ms > reconnected_at))
                .count()
                >= 3
        })
        .await;
    events.assert_sequence(&id);
    if let Some((from_ms, to_ms)) = outage {
        let during = seen
            .iter()
            .filter(
                |e| matches!(e, Event::Heartbeat(h) if h.at_ms > from_ms + 200 && h.at_ms < to_ms),
            )
            .count();
        assert!(
            during >= 3,
            "heartbeats from the {} ms outage: {during}",
            to_ms - from_ms
        );
    }

    let exit = agent.stop_and_join().await.unwrap();
    assert_eq!((exit.done, exit.requeued), (1, 1));
}

#[tokio::test]
async fn a_frozen_agent_gives_up_the_task_its_worker_finished_and_carries_on() {
    let (ns, broker, mut events) = setup().await;
    let (mut agent, id) = start_binary(&ns, &broker, "frozen").await;
    let agent_pid = agent.proc.pid();
    let queue = broker.names.stage_queue(&TestNs::stage("frozen"));
    broker.wait_for_connection(&id).await;
    submit(&broker, "frozen", "Z-1", b"thawed").await;
    events
        .until(&id, "the task to start", |e| has(e, "task_started"))
        .await;

    // Freeze the agent (not its worker, which has a process group of
    // its own); the broker takes the task back from it.
    agent.proc.signal("STOP");
    broker.close_connection(&id).await;
    eventually(
        Duration::from_secs(10),
        "the task to be requeued",
        || async {
            {
                let got = broker.probe(&queue).await;
                anyhow::ensure!(got == Some((1, 0)), "{got:?}");
                Ok(())
            }
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the worker to finish while the agent is frozen",
        || async { children_all_exited(agent_pid) },
    )
    .await;
    agent.proc.signal("CONT");

    let seen = events.until_step(&id, "Z-1", "succeeded#1").await;
    assert_eq!(
        task_story(&seen, "Z-1"),
        [
            "started#1",
            "abandoned#1:connection lost",
            "started#1",
            "succeeded#1"
        ]
    );
    assert_eq!(
        abandoned(&seen)[0].result,
        WorkerResult::Succeeded,
        "the worker had finished; its result was discarded"
    );
    let after = broker.names.stage_queue(&TestNs::stage("after"));
    assert_eq!(broker.probe(&after).await, Some((1, 0)), "handed on once");
    events.assert_sequence(&id);

    terminate_cleanly(&mut agent).await;
}

#[tokio::test]
async fn events_published_through_an_outage_reach_the_stream_in_order() {
    let (_ns, broker, mut reader) = setup().await;
    let url = guildhall_broker::AmqpUrl::parse(&amqp_url()).unwrap();
    let sender: AgentId = format!("outage-{:04x}", rand::random::<u16>())
        .parse()
        .unwrap();
    let marker = |n: u64| Event::Marker(Marker { at_ms: n, nonce: n });
    let first = connect(&url, "guildhall-agent-tests/events").await.unwrap();
    let (events, _task) = EventPublisher::spawn(
        Publisher::open(&first).await.unwrap(),
        broker.names.events_stream(),
        sender.clone(),
        EventPublisherConfig {
            flush_interval: Duration::from_millis(10),
            max_batch: 2,
            ..EventPublisherConfig::default()
        },
    );
    events.emit(marker(1));
    events.emit_confirmed(marker(2)).await.unwrap();

    first.close(200, "outage".into()).await.unwrap();
    for n in 3..=6 {
        events.emit(marker(n));
    }
    let started = Instant::now();
    let refused = events.emit_confirmed(marker(7)).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the waiter is told promptly"
    );
    assert_eq!(events.stats().pending.load(Ordering::Relaxed), 5);

    let second = connect(&url, "guildhall-agent-tests/events").await.unwrap();
    events
        .reconnected(Publisher::open(&second).await.unwrap())
        .await;
    events.emit_confirmed(marker(8)).await.unwrap();
    let seen = reader
        .until(&sender, "all eight events", |e| e.len() >= 8)
        .await;
    let order: Vec<u64> = seen
        .iter()
        .map(|e| match e {
            Event::Marker(m) => m.nonce,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(order, (1..=8).collect::<Vec<_>>());
    assert_eq!(reader.assert_sequence(&sender), 5, "batches of two");
    assert_eq!(events.stats().dropped.load(Ordering::Relaxed), 0);
    let _ = second.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_declaration_refused_after_a_reconnect_ends_the_run() {
    let (ns, broker, _events) = setup().await;
    let agent = start_agent(&broker, agent_config(&ns, "fa", Some("fb"), exec("cat"))).await;
    let id = agent.id().clone();
    broker.wait_for_connection(&id).await;
    // Replace the next stage's queue with one of other arguments: no
    // retry can make the agent's declaration of it succeed.
    let queue = broker.names.stage_queue(&TestNs::stage("fb"));
    guildhall_broker::topology::delete_queue(&broker.conn, &queue)
        .await
        .unwrap();
    let ch = broker.conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    broker.close_connection(&id).await;
    let err = tokio::time::timeout(Duration::from_secs(20), agent.join())
        .await
        .expect("the run ends instead of retrying")
        .unwrap_err()
        .to_string();
    assert!(err.contains("retrying cannot help"), "{err}");
    assert!(err.contains("PRECONDITION"), "{err}");
    assert!(err.contains(&queue), "{err}");
}

/// `Ok` once `pid` has children and all of them have exited (zombies its
/// parent has not reaped: it is stopped).
fn children_all_exited(pid: u32) -> anyhow::Result<()> {
    let mut children = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after it.
        let mut fields = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        if ppid == Some(pid.to_string().as_str()) {
            children += 1;
            anyhow::ensure!(state == Some("Z"), "a child still runs");
        }
    }
    anyhow::ensure!(children > 0, "no child yet");
    Ok(())
}
