//! Coordinator high availability (issue 20), with real processes on the
//! machine's broker: two coordinators of one namespace, exactly one leads
//! (`/api/cluster`, `/healthz`, `guildhall_leader`); a frozen agent is
//! recovered (its connection closed) by the leader alone; the leader
//! SIGKILLed, then the next one SIGSTOPped: each time another leads within
//! seconds (the times are printed, not asserted tightly), and the one that
//! wakes up from SIGSTOP steps down with an older epoch. A third-party
//! `LeaderElected` (a forged sender) changes nothing.

use guildhall_proto::{Envelope, Event, LeaderElected};
use guildhall_tests::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// `/api/cluster` of a coordinator.
async fn cluster(c: &Coordinator) -> anyhow::Result<Value> {
    c.api.get_ok("/api/cluster").await
}

/// The value of `guildhall_leader_actions_total{action=...}` on `c`.
async fn actions(c: &Coordinator, action: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{}/metrics", c.api.base))
        .await?
        .text()
        .await?;
    let prefix = format!("guildhall_leader_actions_total{{action=\"{action}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// Waits until exactly one of `cs` acts as the leader; its index, its
/// epoch and how long it took.
async fn one_leader(cs: &[&Coordinator], what: &str) -> (usize, u64, Duration) {
    let started = Instant::now();
    let (i, epoch) = eventually(Duration::from_secs(30), what, || async {
        let mut leading = Vec::new();
        for (i, c) in cs.iter().enumerate() {
            let v = cluster(c).await?;
            if v["acting"] == true {
                leading.push((i, v["epoch"].as_u64().unwrap_or(0)));
            }
        }
        anyhow::ensure!(leading.len() == 1, "leading: {leading:?}");
        Ok(leading[0])
    })
    .await;
    (i, epoch, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_coordinator_leads_and_another_takes_over_when_it_dies_or_freezes() {
    let ns = TestNs::new("leader");
    let a = spawn_coordinator(&ns, &[]).await.unwrap();
    let b = spawn_coordinator(&ns, &[]).await.unwrap();
    let (first, epoch1, _) = one_leader(&[&a, &b], "one leader of two").await;
    let (leader, follower) = if first == 0 { (a, b) } else { (b, a) };
    // Both read the same leader from the stream; /healthz says who leads.
    let leader_id = cluster(&leader).await.unwrap()["coordinator"].clone();
    eventually(
        Duration::from_secs(10),
        "the follower reads the election",
        || async {
            let v = cluster(&follower).await?;
            anyhow::ensure!(v["leader"]["id"] == leader_id, "{v}");
            anyhow::ensure!(v["leading"] == false && v["epoch"] == 0, "{v}");
            Ok(())
        },
    )
    .await;
    let health = leader.api.get_ok("/healthz").await.unwrap();
    assert_eq!(
        (health["leader"].clone(), health["epoch"].as_u64()),
        (Value::Bool(true), Some(epoch1))
    );
    let health = follower.api.get_ok("/healthz").await.unwrap();
    assert_eq!(health["leader"], false);

    // A frozen agent: the leader alone closes its connection.
    let agent = spawn_agent(
        &ns,
        "frozen-1",
        "work",
        &["--exec", "cat", "--heartbeat", "1s"],
    )
    .await
    .unwrap();
    let broker = Broker::connect(&ns).await.unwrap();
    let agent_id = "frozen-1".parse().unwrap();
    broker.wait_for_connection(&agent_id).await;
    eventually(Duration::from_secs(10), "both see the agent", || async {
        for c in [&leader, &follower] {
            c.api.get_ok("/api/workers/frozen-1").await?;
        }
        Ok(())
    })
    .await;
    agent.proc.signal("STOP");
    eventually(
        Duration::from_secs(30),
        "the frozen agent's connection closed",
        || async {
            let closed = actions(&leader, "close_connection").await?;
            anyhow::ensure!(closed >= 1, "not yet");
            Ok(())
        },
    )
    .await;
    assert_eq!(
        actions(&follower, "close_connection").await.unwrap(),
        0,
        "a follower does not act"
    );
    agent.proc.signal("CONT");

    // A forged election (an agent's sender) changes nothing.
    let forged = Envelope {
        sender: "agent-evil".parse().unwrap(),
        incarnation: 1,
        seq: 1,
        sent_at_ms: guildhall_broker::now_ms(),
        events: vec![Event::LeaderElected(LeaderElected {
            at_ms: guildhall_broker::now_ms(),
            epoch: 1_000,
        })],
    };
    broker
        .publish_raw_event(&forged.encode().unwrap())
        .await
        .unwrap();

    // The leader is SIGKILLed: the follower leads, with a newer epoch.
    let mut leader = leader;
    let killed = Instant::now();
    leader.proc.signal("KILL");
    let _ = leader.proc.child.wait().await;
    let (_, epoch2, _) = one_leader(&[&follower], "the follower takes over").await;
    let after_kill = killed.elapsed();
    assert!(epoch2 > epoch1, "{epoch2} after {epoch1}");
    let v = cluster(&follower).await.unwrap();
    assert_eq!(v["leader"]["epoch"].as_u64(), Some(epoch2), "{v}");

    // A new standby; then the leader freezes: the standby takes over, and
    // the frozen one, woken up, steps down.
    let standby = spawn_coordinator(&ns, &[]).await.unwrap();
    eventually(Duration::from_secs(10), "the standby follows", || async {
        let v = cluster(&standby).await?;
        anyhow::ensure!(v["leader"]["epoch"].as_u64() == Some(epoch2), "{v}");
        Ok(())
    })
    .await;
    let frozen = follower;
    let stopped = Instant::now();
    frozen.proc.signal("STOP");
    let (_, epoch3, _) = one_leader(&[&standby], "the standby takes over").await;
    let after_stop = stopped.elapsed();
    assert!(epoch3 > epoch2);
    frozen.proc.signal("CONT");
    eventually(
        Duration::from_secs(30),
        "the woken leader steps down",
        || async {
            let v = cluster(&frozen).await?;
            anyhow::ensure!(v["acting"] == false && v["leading"] == false, "{v}");
            anyhow::ensure!(v["leader"]["epoch"].as_u64() == Some(epoch3), "{v}");
            Ok(())
        },
    )
    .await;
    let (i, _, _) = one_leader(&[&frozen, &standby], "still one leader").await;
    assert_eq!(i, 1);
    eprintln!(
        "failover: {:.1} s after SIGKILL, {:.1} s after SIGSTOP",
        after_kill.as_secs_f64(),
        after_stop.as_secs_f64()
    );
    drop(agent);
}
