//! Stopping: a graceful stop finishes the task in hand and leaves the rest
//! queued, a stop timeout gives it back, and the binary does the same on
//! SIGTERM.

use super::{message_id, setup, start_binary, submit, terminate_cleanly};
use guildhall_proto::Event;
use guildhall_tests::events::{has, kinds_but_heartbeats, task_story};
use guildhall_tests::inproc::{agent_config, exec, start_agent};
use guildhall_tests::{TestNs, eventually};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test]
async fn a_stop_finishes_the_task_in_hand_and_leaves_the_rest_queued() {
    let (ns, broker, mut events) = setup().await;
    let agent = start_agent(
        &broker,
        agent_config(&ns, "slow", Some("after"), exec("sleep 1; cat")),
    )
    .await;
    let id = agent.id().clone();
    submit(&broker, "slow", "L-1", b"one").await;
    events
        .until(&id, "the task to start", |e| has(e, "task_started"))
        .await;
    submit(&broker, "slow", "L-2", b"two").await;
    agent.stop();
    let exit = agent.join().await.unwrap();
    assert_eq!((exit.done, exit.requeued), (1, 0));
    let after = broker
        .take(&broker.names.stage_queue(&TestNs::stage("after")))
        .await;
    assert_eq!(
        (message_id(&after).as_str(), &after.delivery.data[..]),
        ("L-1", &b"one"[..])
    );
    let queue = broker.names.stage_queue(&TestNs::stage("slow"));
    assert_eq!(broker.probe(&queue).await, Some((1, 0)), "L-2 stays queued");
    let seen = events
        .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
        .await;
    let kinds = kinds_but_heartbeats(&seen);
    assert_eq!(
        kinds,
        ["hello", "task_started", "task_succeeded", "agent_stopping"]
    );
}

#[tokio::test]
async fn a_stop_timeout_gives_the_task_back_to_the_queue() {
    let (ns, broker, mut events) = setup().await;
    let mut config = agent_config(&ns, "stuck", None, exec("sleep 30"));
    config.shutdown_timeout = Duration::from_millis(300);
    let agent = start_agent(&broker, config).await;
    let id = agent.id().clone();
    submit(&broker, "stuck", "K-1", b"x").await;
    events
        .until(&id, "the task to start", |e| has(e, "task_started"))
        .await;
    let started = Instant::now();
    let exit = agent.stop_and_join().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!((exit.done, exit.requeued), (0, 1));
    let queue = broker.names.stage_queue(&TestNs::stage("stuck"));
    // The broker requeues asynchronously after the agent's nack.
    eventually(Duration::from_secs(5), "K-1 back in the queue", || async {
        {
            let got = broker.probe(&queue).await;
            anyhow::ensure!(got == Some((1, 0)), "{got:?}");
            Ok(())
        }
    })
    .await;
    let seen = events
        .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
        .await;
    assert_eq!(
        task_story(&seen, "K-1"),
        ["started#1", "abandoned#1:stop timeout"]
    );
}

#[tokio::test]
async fn the_binary_finishes_the_task_in_hand_on_sigterm() {
    let (ns, broker, mut events) = setup().await;
    let (mut agent, id) = start_binary(&ns, &broker, "term").await;
    submit(&broker, "term", "G-1", b"graceful").await;
    events
        .until(&id, "the task to start", |e| has(e, "task_started"))
        .await;
    terminate_cleanly(&mut agent).await;
    let after = broker
        .take(&broker.names.stage_queue(&TestNs::stage("after")))
        .await;
    assert_eq!(&after.delivery.data[..], b"graceful");
    let seen = events
        .until(&id, "AgentStopping", |e| has(e, "agent_stopping"))
        .await;
    assert_eq!(
        task_story(&seen, "G-1"),
        ["started#1", "succeeded#1"],
        "the task finished before the exit"
    );
    let Some(Event::AgentStopping(stopping)) = seen.iter().find(|e| e.kind() == "agent_stopping")
    else {
        unreachable!()
    };
    assert_eq!(stopping.reason, "SIGTERM");
}

/// Issue 20: an agent told to stop while its broker node is gone, with no
/// task in hand, used to stay `draining` for the whole shutdown timeout
/// (30 s). It waits a few seconds for the broker, then exits cleanly.
#[tokio::test]
async fn a_stop_while_the_broker_is_away_with_nothing_in_hand_ends_in_seconds() {
    use guildhall_tests::proxy::TcpProxy;
    let ns = TestNs::new("stop-away");
    // The broker's host:port, from `amqp://user:pass@host:port/vhost`.
    let url = guildhall_tests::amqp_url();
    let authority = url.split('@').nth(1).unwrap_or("127.0.0.1:5672");
    let target = authority.split('/').next().unwrap_or("127.0.0.1:5672");
    let proxy = TcpProxy::start(target.parse().expect("an address"))
        .await
        .unwrap();
    let url = proxy.amqp_url();
    let mut agent = guildhall_tests::spawn_agent(
        &ns,
        "away-1",
        "away",
        &["--amqp-url", &url, "--exec", "cat"],
    )
    .await
    .unwrap();
    let broker = guildhall_tests::Broker::connect(&ns).await.unwrap();
    broker.wait_for_connection(&"away-1".parse().unwrap()).await;
    proxy.cut();
    // The agent notices (its heartbeat or the socket) and reconnects in vain.
    eventually(
        Duration::from_secs(30),
        "the agent to lose the broker",
        || async {
            let log = std::fs::read_to_string(ns.log_dir.join("away-1.log")).unwrap_or_default();
            anyhow::ensure!(log.contains("lost the broker"), "not yet");
            Ok(())
        },
    )
    .await;
    let started = Instant::now();
    agent.proc.signal("TERM");
    let status = agent
        .proc
        .wait(Duration::from_secs(25))
        .await
        .expect("the agent exits well before its 30 s shutdown timeout");
    eprintln!(
        "stopped {:?} after SIGTERM without a broker",
        started.elapsed()
    );
    assert!(status.success(), "{status:?}");
}
