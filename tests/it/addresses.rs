//! Several broker addresses (issue 20, the first part): the coordinator and
//! an agent, each given a list whose other entries refuse connections plus
//! the real broker, connect, carry tasks, and reconnect after their
//! connection is closed; the management API likewise takes a list. No
//! password reaches their output.
//!
//! The refusing entries come first in the list and twice, so that most
//! runs try one of them before the broker (the order is shuffled).

use guildhall_tests::*;
use serde_json::json;
use std::time::Duration;

/// A password no log line may show.
const SECRET: &str = "n0t-in-any-l0g";

/// The user name of `url` and what follows its authority (`/%2f...`).
fn user_and_path(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let user = authority.rsplit_once('@').map_or("guest", |(userinfo, _)| {
        userinfo.split(':').next().unwrap_or("guest")
    });
    (user.to_owned(), path.to_owned())
}

/// Two addresses like `url` (same user and virtual host) with `password`,
/// on closed ports of this machine: connections are refused at once.
fn refusing(url: &str, password: &str) -> [String; 2] {
    let (user, path) = user_and_path(url);
    [free_port(), free_port()]
        .map(|port| format!("amqp://{user}:{password}@127.0.0.1:{port}{path}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_and_an_agent_work_with_dead_addresses_in_their_lists() {
    let ns = TestNs::new("addrs");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("work").await.unwrap();
    let real = amqp_url();
    let [dead1, dead2] = refusing(&real, SECRET);
    // Repeated flags for the coordinator, one comma list for the agent.
    let real_mgmt = management_url();
    let dead_mgmt = format!("http://guest:{SECRET}@127.0.0.1:{}", free_port());
    let mgmt_list = format!("{dead_mgmt},{real_mgmt}");
    let c = spawn_coordinator(
        &ns,
        &[
            "--amqp-url",
            &dead1,
            "--amqp-url",
            &format!("{dead2},{real}"),
            "--management-url",
            &mgmt_list,
            "--missed-heartbeats",
            "6",
        ],
    )
    .await
    .unwrap();
    let agent_list = format!("{dead1}, {dead2} ,{real}");
    let agent = spawn_agent(
        &ns,
        "a1",
        "work",
        &[
            "--amqp-url",
            &agent_list,
            "--simulate",
            "median=10ms,spread=0",
            "--heartbeat",
            "500ms",
        ],
    )
    .await
    .unwrap();
    let api = &c.api;
    eventually(Duration::from_secs(20), "a1 idle", || async {
        let w = api.get_ok("/api/workers/a1").await?;
        anyhow::ensure!(w["status"] == "idle", "{w}");
        Ok(())
    })
    .await;

    // Tasks submitted through the coordinator (its publishing link) are
    // done by the agent (its link) and seen done (the events consumer).
    for i in 0..5 {
        let body = json!({"stage": "work", "id": format!("ADDR-{i}"), "payload": "x"});
        let (status, body) = api.post_raw("/api/tasks", &body.to_string()).await.unwrap();
        assert!(status < 300, "{status} {body}");
    }
    for i in 0..5 {
        eventually(
            Duration::from_secs(20),
            &format!("ADDR-{i} done"),
            || async {
                let t = api.get_ok(&format!("/api/tasks/ADDR-{i}")).await?;
                anyhow::ensure!(t["status"] == "succeeded", "{t}");
                Ok(())
            },
        )
        .await;
    }

    // The management API answered through the list (its first entry
    // refuses: the start-up check moved on to the second).
    let health = api.get_ok("/healthz").await.unwrap();
    assert_eq!(health["management_api"], true, "{health}");

    // The agent's connection closed by the broker: it reconnects at once
    // (one attempt over the list), and carries on.
    let mgmt = management();
    let name = ns
        .names
        .agent_connection_name(&"a1".parse().expect("an agent id"));
    eventually(
        Duration::from_secs(20),
        "the agent's connection closed",
        || async {
            let closed = mgmt.close_connections_named(&name, "test").await?;
            anyhow::ensure!(closed > 0, "not listed yet");
            Ok(())
        },
    )
    .await;
    eventually(Duration::from_secs(20), "the agent reconnected", || async {
        anyhow::ensure!(
            agent.proc.log_text().contains("reconnected to the broker"),
            "not yet"
        );
        Ok(())
    })
    .await;
    let body = json!({"stage": "work", "id": "ADDR-after", "payload": "x"});
    let (status, body) = api.post_raw("/api/tasks", &body.to_string()).await.unwrap();
    assert!(status < 300, "{status} {body}");
    eventually(Duration::from_secs(20), "ADDR-after done", || async {
        let t = api.get_ok("/api/tasks/ADDR-after").await?;
        anyhow::ensure!(t["status"] == "succeeded", "{t}");
        Ok(())
    })
    .await;

    // No password in either process's output: neither the dead entries'
    // nor the real broker's.
    let real_userinfo = real
        .split("://")
        .nth(1)
        .and_then(|rest| rest.rsplit_once('@'))
        .map(|(userinfo, _)| userinfo.to_owned())
        .unwrap_or_default();
    for (who, log) in [
        ("coordinator", c.proc.log_text()),
        ("agent", agent.proc.log_text()),
    ] {
        assert!(!log.contains(SECRET), "{who} logged a password:\n{log}");
        if real_userinfo.contains(':') {
            assert!(
                !log.contains(&format!("{real_userinfo}@")),
                "{who} logged the broker's password:\n{log}"
            );
        }
    }
}

#[tokio::test]
async fn an_agent_whose_addresses_all_refuse_names_each_without_passwords() {
    let ns = TestNs::new("addrs");
    let [dead1, dead2] = refusing(&amqp_url(), SECRET);
    let mut agent = spawn_agent(
        &ns,
        "a-dead",
        "work",
        &["--amqp-url", &format!("{dead1},{dead2}"), "--simulate", ""],
    )
    .await
    .unwrap();
    let status = agent.proc.wait(Duration::from_secs(30)).await.unwrap();
    assert!(!status.success());
    let log = eventually(Duration::from_secs(5), "the error line", || async {
        let log = agent.proc.log_text();
        anyhow::ensure!(
            log.contains("cannot reach RabbitMQ at any of 2 addresses"),
            "{log}"
        );
        Ok(log)
    })
    .await;
    assert!(log.contains(&dead1.replace(SECRET, "***")), "{log}");
    assert!(!log.contains(SECRET), "{log}");
}
