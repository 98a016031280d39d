//! Dead-letter calls under pressure: a hundred at once, and a queue too deep
//! for the broker to list or replay within `--broker-timeout`.

use super::*;
use guildhall_broker::now_ms;
use guildhall_broker::task::TaskMeta;
use guildhall_broker::topology::probe_queue;
use guildhall_proto::TaskId;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Puts `n` tasks straight into the dead-letter queue of `stage`, as an agent
/// would dead-letter them, with a card number in each payload.
async fn fill_dead(broker: &Broker, stage: &str, n: usize) {
    let exchange = broker.names.dead_exchange();
    let payload = format!("card 4111 1111 1111 1111 {}", "x".repeat(1000));
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let meta = TaskMeta::submission(TaskId::new(format!("D-{i}")).unwrap(), now_ms(), None);
        pending.push(
            broker
                .publisher
                .start(&exchange, stage, payload.as_bytes(), meta.properties())
                .await
                .unwrap(),
        );
    }
    for p in pending {
        p.wait().await.unwrap();
    }
}

/// Ready messages in `queue`.
async fn ready(broker: &Broker, queue: &str) -> u64 {
    u64::from(
        probe_queue(&broker.conn, queue)
            .await
            .unwrap()
            .expect("the queue exists")
            .ready,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_listings_keep_memory_modest_and_take_nothing() {
    let ns = TestNs::new("hh-dead100");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("p1").await.unwrap();
    fill_dead(&broker, "p1", 50).await;
    // A generous time-out: this test measures memory, not speed.
    let c = spawn_coordinator(&ns, &["--broker-timeout", "120s"])
        .await
        .unwrap();
    let pid = c.proc.pid();
    let first = c.api.get_ok("/api/dead/p1").await.unwrap();
    assert_eq!(first["count"], 50);
    let before = rss_mib(pid);
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_mib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let api = Api::new(&c.api.base);
        set.spawn(async move { api.get("/api/dead/p1").await });
    }
    while let Some(done) = set.join_next().await {
        let (status, body) = done.unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["tasks"].as_array().map(Vec::len), Some(50));
    }
    let took = started.elapsed();
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed);
    let after = rss_mib(pid);
    eprintln!(
        "hostile_http: 100 concurrent GET /api/dead (50 dead letters) in {took:?}; coordinator RSS {before} MiB before, {peak} MiB at most, {after} MiB after"
    );
    assert!(peak <= before + 128, "peak {peak} MiB (was {before} MiB)");
    // Listing took nothing.
    let queue = ns.names.dead_queue(&TestNs::stage("p1"));
    eventually(
        Duration::from_secs(10),
        "50 dead letters still ready",
        || async {
            let n = ready(&broker, &queue).await;
            anyhow::ensure!(n == 50, "{n}");
            Ok(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_dead_letter_queue_answers_504_in_time_and_loses_nothing() {
    let ns = TestNs::new("hh-dead504");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("p1").await.unwrap();
    const N: u64 = 1_000;
    fill_dead(&broker, "p1", N as usize).await;
    // A quorum queue answers each basic.get in a Raft round: listing 1,000
    // takes seconds (5 s measured), replaying them longer; 200 ms is far
    // too short, as a stuck broker would be.
    let c = spawn_coordinator(&ns, &["--broker-timeout", "200ms"])
        .await
        .unwrap();
    let queue = ns.names.dead_queue(&TestNs::stage("p1"));
    let stage_queue = ns.names.stage_queue(&TestNs::stage("p1"));

    let started = std::time::Instant::now();
    let (status, body) = c.api.get("/api/dead/p1?limit=1000").await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("--broker-timeout"),
        "{body}"
    );
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    eventually(
        Duration::from_secs(20),
        "every dead letter back",
        || async {
            let n = ready(&broker, &queue).await;
            anyhow::ensure!(n == N, "{n} ready");
            Ok(())
        },
    )
    .await;

    let started = std::time::Instant::now();
    let (status, body) = c
        .api
        .post_raw("/api/dead/p1/replay", r#"{"all": true}"#)
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("--broker-timeout"),
        "{body}"
    );
    assert!(took < Duration::from_secs(6), "answered after {took:?}");
    // Each task is a dead letter or back on its stage (one could be both
    // only if the broker took over 2 s past the deadline to confirm it).
    let (dead, queued) = eventually(Duration::from_secs(20), "all accounted for", || async {
        let (dead, queued) = (
            ready(&broker, &queue).await,
            ready(&broker, &stage_queue).await,
        );
        anyhow::ensure!((N..=N + 1).contains(&(dead + queued)), "{dead} + {queued}");
        Ok((dead, queued))
    })
    .await;
    eprintln!(
        "hostile_http: listing 1000 dead letters cut at 200 ms, answered 504; replay cut too: {queued} replayed, {dead} still dead"
    );
}
