//! A stalled events consumer is replaced (issue 20): the coordinator's
//! stream consumer connection is frozen (a proxy stops forwarding on it but
//! keeps its sockets open) while its other connections work, with an AMQP
//! heartbeat of 60 s so that the client library would notice only after
//! two minutes. The coordinator's echo markers are confirmed but never
//! read back: within seconds it gives the consumer up, opens another, and
//! hears the fleet again.

use guildhall_tests::proxy::TcpProxy;
use guildhall_tests::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_events_consumer_is_replaced_and_the_fleet_heard_again() {
    let ns = TestNs::new("stall");
    let url = amqp_url();
    let authority = url.split('@').nth(1).unwrap_or("127.0.0.1:5672");
    let target = authority.split('/').next().unwrap_or("127.0.0.1:5672");
    let proxy = TcpProxy::start(target.parse().expect("an address"))
        .await
        .unwrap();
    let through = format!("{}?heartbeat=60", proxy.amqp_url());
    let c = spawn_coordinator(&ns, &["--amqp-url", &through])
        .await
        .unwrap();
    let _agent = spawn_agent(&ns, "st-1", "work", &["--exec", "cat", "--heartbeat", "1s"])
        .await
        .unwrap();
    let heard = |within_ms: u64| {
        let api = c.api.clone();
        async move {
            let w = api.get_ok("/api/workers/st-1").await?;
            let ago = w["last_seen_ago_ms"].as_u64().unwrap_or(u64::MAX);
            anyhow::ensure!(w["status"] == "idle" && ago < within_ms, "{w}");
            Ok(())
        }
    };
    eventually(Duration::from_secs(20), "the agent heard", || heard(3_000)).await;

    let frozen = proxy.freeze_where(b"/ingest");
    assert_eq!(frozen, 1, "the consumer's connection, and only it");
    let at = Instant::now();
    // Deaf at first (its echoes do not come back): no one is judged.
    eventually(Duration::from_secs(10), "the coordinator deaf", || async {
        let log = c.proc.log_text();
        anyhow::ensure!(log.contains("cannot hear the fleet"), "not yet");
        Ok(())
    })
    .await;
    // Then replaced: heard again, long before a 60 s heartbeat could tell.
    eventually(
        Duration::from_secs(45),
        "the consumer replaced and the agent heard again",
        || async {
            let log = c.proc.log_text();
            anyhow::ensure!(log.contains("consumer stalled"), "not replaced yet");
            heard(3_000).await
        },
    )
    .await;
    eprintln!(
        "stalled consumer replaced, agent heard {:.1} s after the freeze",
        at.elapsed().as_secs_f64()
    );
    let w = c.api.get_ok("/api/workers/st-1").await.unwrap();
    assert_eq!(w["status"], "idle", "never judged dead while deaf: {w}");
    let m = c.api.metrics().await.unwrap();
    assert_eq!(
        m.value("guildhall_worker_deaths_total", &[]).unwrap_or(0.0),
        0.0
    );
}
