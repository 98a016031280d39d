//! What a hostile (or broken) publisher on the events stream can do to the
//! coordinator: poison messages, forged envelopes, forged heartbeats across
//! namespaces, huge text; and what a coordinator that could not hear the
//! fleet for a while does (nothing rash). Real broker, real binaries.

use guildhall_proto::{
    AgentId, AgentState, AgentStopping, Envelope, Event, Heartbeat, Hello, TaskFailed,
    TaskSubmitted, WorkerMode,
};
use guildhall_tests::raw_amqp::{self, RawMessage};
use guildhall_tests::*;
use std::time::Duration;

/// Agents of `stage` simulating work, heartbeating every 500 ms.
async fn simulated_agents(ns: &TestNs, stage: &str, ids: &[&str]) -> Vec<Agent> {
    let mut agents = Vec::new();
    for id in ids {
        let agent = spawn_agent(
            ns,
            id,
            stage,
            &["--simulate", "median=5ms", "--heartbeat", "500ms"],
        )
        .await
        .expect("agent");
        agents.push(agent);
    }
    agents
}

/// Waits until every one of `ids` is listed with `status`.
async fn wait_workers(api: &Api, ids: &[&str], status: &str) {
    eventually(
        Duration::from_secs(30),
        &format!("{ids:?} {status}"),
        || async {
            for id in ids {
                let w = api.get_ok(&format!("/api/workers/{id}")).await?;
                anyhow::ensure!(w["status"] == status, "{id}: {}", w["status"]);
            }
            Ok(())
        },
    )
    .await;
}

/// Deaths declared and connections closed so far.
async fn verdicts(api: &Api) -> (f64, f64) {
    let m = api.metrics().await.expect("metrics");
    (
        m.value("guildhall_worker_deaths_total", &[]).unwrap_or(0.0),
        m.value(
            "guildhall_connections_closed_total",
            &[("outcome", "closed")],
        )
        .unwrap_or(0.0),
    )
}

/// For `how_long`, checks every 250 ms that no worker was declared dead nor
/// had its connection closed, and that `ids` are alive.
async fn nobody_judged(api: &Api, ids: &[&str], how_long: Duration) {
    let end = tokio::time::Instant::now() + how_long;
    while tokio::time::Instant::now() < end {
        assert_eq!(
            verdicts(api).await,
            (0.0, 0.0),
            "a healthy worker was judged"
        );
        for id in ids {
            let w = api.get_ok(&format!("/api/workers/{id}")).await.unwrap();
            assert!(
                ["idle", "processing", "suspect"].contains(&w["status"].as_str().unwrap_or("")),
                "{id}: {w}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn malformed(m: &Metrics, reason: &str) -> f64 {
    m.value("guildhall_events_malformed_total", &[("reason", reason)])
        .unwrap_or(0.0)
}

fn submitted(id: &str, stage: &str) -> Envelope {
    Envelope {
        sender: AgentId::new("producer-1").unwrap(),
        incarnation: 1,
        seq: 1,
        sent_at_ms: guildhall_broker::now_ms(),
        events: vec![Event::TaskSubmitted(TaskSubmitted {
            at_ms: guildhall_broker::now_ms(),
            task_id: id.parse().unwrap(),
            stage: TestNs::stage(stage),
            payload_bytes: 0,
        })],
    }
}

fn heartbeat(stage: &str, heartbeat_ms: u32) -> Event {
    Event::Heartbeat(Box::new(Heartbeat {
        at_ms: guildhall_broker::now_ms(),
        version: "forged".into(),
        stage: TestNs::stage(stage),
        next: None,
        state: AgentState::Idle,
        concurrency: 1,
        heartbeat_ms,
        in_hand: Vec::new(),
        done: 0,
        failed: 0,
        worker: None,
        agent: None,
        hostname: "forger".into(),
        worker_restarts: 0,
        rtt_ms: None,
    }))
}

fn stopping() -> Event {
    Event::AgentStopping(AgentStopping {
        at_ms: guildhall_broker::now_ms(),
        reason: "forged".into(),
    })
}

fn envelope(sender: &str, incarnation: u64, seq: u64, events: Vec<Event>) -> Vec<u8> {
    Envelope {
        sender: AgentId::new(sender).unwrap(),
        incarnation,
        seq,
        sent_at_ms: guildhall_broker::now_ms(),
        events,
    }
    .encode()
    .unwrap()
}

/// An envelope as agents wrote them before incarnations (version 1).
fn envelope_v1(sender: &str, seq: u64, events: &[Event]) -> Vec<u8> {
    let mut bytes = postcard::to_allocvec(&1u16).unwrap();
    bytes.extend(postcard::to_allocvec(&(sender, seq, guildhall_broker::now_ms())).unwrap());
    bytes.extend(postcard::to_allocvec(&(events.len() as u32)).unwrap());
    for e in events {
        let frame = postcard::to_allocvec(e).unwrap();
        bytes.extend(postcard::to_allocvec(&(frame.len() as u32)).unwrap());
        bytes.extend(frame);
    }
    bytes
}

#[tokio::test]
async fn a_poison_message_on_the_events_stream_stalls_no_reader_and_kills_no_agent() {
    let ns = TestNs::new("poison-stream");
    let mut c = spawn_coordinator(&ns, &[]).await.unwrap();
    let ids = ["p1-a", "p1-b", "p1-c"];
    let _agents = simulated_agents(&ns, "p1", &ids).await;
    wait_workers(&c.api, &ids, "idle").await;

    // A message_id that is not UTF-8, and a header name that is not either:
    // any AMQP client can send them (pika does), lapin could not parse them.
    let stream = ns.names.events_stream();
    raw_amqp::publish(
        &amqp_url(),
        "",
        &stream,
        &RawMessage {
            message_id: Some(b"\xc3\x28".to_vec()),
            body: b"\x01x".to_vec(),
            ..RawMessage::default()
        },
    )
    .await
    .unwrap();
    raw_amqp::publish(
        &amqp_url(),
        "",
        &stream,
        &RawMessage {
            headers: vec![(b"x-\xff\xfe".to_vec(), b"\xff".to_vec())],
            body: b"\x01y".to_vec(),
            ..RawMessage::default()
        },
    )
    .await
    .unwrap();
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage("p1").await.unwrap();
    broker
        .publish_raw_event(&submitted("T-after", "p1").encode().unwrap())
        .await
        .unwrap();

    // Both are counted and skipped; what comes after is applied.
    eventually(Duration::from_secs(15), "the poison skipped", || async {
        let m = c.api.metrics().await?;
        anyhow::ensure!(malformed(&m, "malformed") >= 2.0, "not counted yet");
        let t = c.api.get_ok("/api/tasks/T-after").await?;
        anyhow::ensure!(t["status"] == "queued", "{t}");
        Ok(())
    })
    .await;
    let h = c.api.get_ok("/healthz").await.unwrap();
    assert_eq!(h["status"], "ok", "{h}");
    // The coordinator kept hearing its agents: nobody judged dead, no
    // connection closed.
    nobody_judged(&c.api, &ids, Duration::from_secs(5)).await;
    let log = c.proc.log_text();
    assert!(
        !log.contains("reconnecting"),
        "the consumer lost its connection:\n{log}"
    );

    // A restart replays the stream past the poison.
    c.proc.terminate(Duration::from_secs(10)).await.unwrap();
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    eventually(
        Duration::from_secs(20),
        "replayed past the poison",
        || async {
            let h = c.api.get_ok("/healthz").await?;
            anyhow::ensure!(h["core"]["caught_up"] == true && h["status"] == "ok", "{h}");
            let t = c.api.get_ok("/api/tasks/T-after").await?;
            anyhow::ensure!(t["status"] == "queued", "{t}");
            Ok(())
        },
    )
    .await;
    nobody_judged(&c.api, &ids, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn forged_envelopes_neither_blind_nor_kill_a_real_agent() {
    let ns = TestNs::new("forged");
    let data = ns.log_dir.join("data");
    let data_dir = data.display().to_string();
    let serve_flags = ["--data-dir", data_dir.as_str(), "--snapshot-interval", "1s"];
    let mut c = spawn_coordinator(&ns, &serve_flags).await.unwrap();
    let _agent = simulated_agents(&ns, "s1", &["s1-a1"]).await;
    wait_workers(&c.api, &["s1-a1"], "idle").await;
    let broker = Broker::connect(&ns).await.unwrap();

    // envelope('s1-a1', seq=10**15, [AgentStopping]), as the tester wrote
    // it (version 1) and as agents write them now (version 2, a run of its
    // own), then a forged restart: a Hello of another run with a 1 ms
    // heartbeat interval, and a stop.
    broker
        .publish_raw_event(&envelope_v1("s1-a1", 1_000_000_000_000_000, &[stopping()]))
        .await
        .unwrap();
    broker
        .publish_raw_event(&envelope(
            "s1-a1",
            0xbad,
            1_000_000_000_000_000,
            vec![stopping()],
        ))
        .await
        .unwrap();
    let hello = Event::Hello(Box::new(Hello {
        at_ms: guildhall_broker::now_ms(),
        version: "forged".into(),
        stage: TestNs::stage("s1"),
        next: None,
        stages: vec![TestNs::stage("s1")],
        concurrency: 1,
        heartbeat_ms: 1,
        hostname: "forger".into(),
        pid: 666,
        mode: WorkerMode::Simulated,
        supervised: false,
    }));
    broker
        .publish_raw_event(&envelope("s1-a1", 0xf00d, 1, vec![hello, stopping()]))
        .await
        .unwrap();
    // A forger who reads the stream knows the agent's run: the same jump in
    // it is refused as a jump.
    let real_run = broker
        .read_events()
        .await
        .unwrap()
        .into_iter()
        .rev()
        .find(|e| e.sender.as_str() == "s1-a1")
        .map(|e| e.incarnation)
        .expect("the agent's envelopes");
    broker
        .publish_raw_event(&envelope(
            "s1-a1",
            real_run,
            1_000_000_000_000_000,
            vec![stopping()],
        ))
        .await
        .unwrap();
    // Then, for 6 s, heartbeats saying the interval is 1 ms, in a run of
    // their own and in version 1 (which has no run).
    for i in 0..20u64 {
        broker
            .publish_raw_event(&envelope("s1-a1", 0xbeef, 10 + i, vec![heartbeat("s1", 1)]))
            .await
            .unwrap();
        broker
            .publish_raw_event(&envelope_v1("s1-a1", 1_000 + i, &[heartbeat("s1", 1)]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let m = c.api.metrics().await.unwrap();
    // The jump in the agent's own run is refused as a jump; the others
    // (version 1, which has no run, and runs of their own without a
    // Hello) as batches of an unknown run.
    assert_eq!(malformed(&m, "seq_jump"), 1.0, "{}", m.text);
    assert!(malformed(&m, "incarnation") >= 42.0, "{}", m.text);
    assert!(
        m.value("guildhall_sender_conflicts_total", &[])
            .unwrap_or(0.0)
            >= 1.0,
        "the forged Hello shows as two runs under one id"
    );
    assert!(
        m.value(
            "guildhall_events_clamped_total",
            &[("field", "heartbeat_interval")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    nobody_judged(&c.api, &["s1-a1"], Duration::from_secs(3)).await;

    // The real agent is followed: its tasks complete, it can be paused.
    for i in 0..5 {
        broker
            .publish_task("s1", &format!("F-{i}"), "x")
            .await
            .unwrap();
    }
    let all_done = || async {
        for i in 0..5 {
            let t = c.api.get_ok(&format!("/api/tasks/F-{i}")).await?;
            anyhow::ensure!(t["status"] == "succeeded", "F-{i}: {t}");
        }
        Ok(())
    };
    eventually(Duration::from_secs(20), "tasks done", all_done).await;
    let (status, body) = c
        .api
        .post_raw("/api/workers/s1-a1/pause", "{}")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = c
        .api
        .post_raw("/api/workers/s1-a1/resume", "{}")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    // Across a coordinator restart (snapshot, then the stream's tail,
    // forgeries included): the same.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    c.proc.terminate(Duration::from_secs(10)).await.unwrap();
    let c = spawn_coordinator(&ns, &serve_flags).await.unwrap();
    wait_workers(&c.api, &["s1-a1"], "idle").await;
    broker.publish_task("s1", "F-after", "x").await.unwrap();
    eventually(
        Duration::from_secs(20),
        "a task after the restart",
        || async {
            let t = c.api.get_ok("/api/tasks/F-after").await?;
            anyhow::ensure!(t["status"] == "succeeded", "{t}");
            Ok(())
        },
    )
    .await;
    nobody_judged(&c.api, &["s1-a1"], Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_forged_heartbeat_closes_no_connection_of_another_namespace() {
    let a = TestNs::new("ns-a");
    let b = TestNs::new("ns-b");
    let c = spawn_coordinator(&a, &[]).await.unwrap();
    // An agent of namespace B, on the same vhost, with an id a forger uses
    // in namespace A.
    let id = format!("victim-{:08x}", rand::random::<u32>());
    let victim = spawn_agent(&b, &id, "s", &["--simulate", "median=5ms"])
        .await
        .unwrap();
    let management = guildhall_broker::Management::new(&management_url(), "/").unwrap();
    let name = b.names.agent_connection_name(&id.parse().unwrap());
    let connection_of_b = || async {
        management
            .connections()
            .await?
            .into_iter()
            .find(|c| c.user_provided_name.as_deref() == Some(name.as_str()))
            .map(|c| c.name)
            .ok_or_else(|| anyhow::anyhow!("not listed"))
    };
    let before = eventually(Duration::from_secs(20), "B's agent listed", connection_of_b).await;

    // One forged heartbeat in A, then silence: A judges its phantom dead
    // and looks for `guildhall-agent/<A>/<id>`, which does not exist.
    let broker = Broker::connect(&a).await.unwrap();
    broker
        .publish_raw_event(&envelope(&id, 1, 1, vec![heartbeat("s", 1000)]))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the phantom judged, nothing closed",
        || async {
            let m = c.api.metrics().await?;
            let v = |o| m.value("guildhall_connections_closed_total", &[("outcome", o)]);
            anyhow::ensure!(v("not_found") == Some(1.0), "{:?}", v("not_found"));
            anyhow::ensure!(v("closed") == Some(0.0), "{:?}", v("closed"));
            Ok(())
        },
    )
    .await;
    // B's agent kept its connection all along.
    assert_eq!(connection_of_b().await.unwrap(), before);
    assert!(
        !victim.proc.log_text().contains("reconnect"),
        "{}",
        victim.proc.log_text()
    );
}

#[tokio::test]
async fn a_coordinator_frozen_for_a_while_judges_no_one_for_its_own_silence() {
    let ns = TestNs::new("frozen-coord");
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let ids = ["f-a", "f-b", "f-c"];
    let _agents = simulated_agents(&ns, "f", &ids).await;
    wait_workers(&c.api, &ids, "idle").await;
    // A stalled VM, a long pause: the coordinator hears nothing for 5 s,
    // more than 3 heartbeat intervals of its agents (500 ms).
    c.proc.signal("STOP");
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.proc.signal("CONT");
    nobody_judged(&c.api, &ids, Duration::from_secs(6)).await;
    let m = c.api.metrics().await.unwrap();
    assert_eq!(
        m.value("guildhall_coordinator_listening", &[]),
        Some(1.0),
        "{}",
        m.text
    );
}

/// Resident memory of a process, and its peak, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

#[tokio::test]
async fn text_from_the_stream_is_bounded_in_bytes() {
    let ns = TestNs::new("bytes");
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    // Five dashboards following the live view.
    let mut streams = Vec::new();
    for _ in 0..5 {
        let r = reqwest::get(format!("{}/api/events", c.api.base))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        streams.push(tokio::spawn(async move {
            let mut r = r;
            let mut bytes = 0usize;
            while let Ok(Some(chunk)) = r.chunk().await {
                bytes += chunk.len();
            }
            bytes
        }));
    }
    // 50 forged workers with 1 MB hostnames, versions and errors.
    let broker = Broker::connect(&ns).await.unwrap();
    let big = "x".repeat(1_000_000 / 2);
    for i in 0..50u64 {
        let mut hb = heartbeat("big", 1000);
        if let Event::Heartbeat(h) = &mut hb {
            h.hostname = big.clone();
            h.version = big.clone();
        }
        let failed = Event::TaskFailed(TaskFailed {
            at_ms: guildhall_broker::now_ms(),
            task_id: format!("B-{i}").parse().unwrap(),
            stage: TestNs::stage("big"),
            attempt: 1,
            started_at_ms: guildhall_broker::now_ms(),
            error: big.clone(),
            error_class: "boom".into(),
            retryable: false,
        });
        broker
            .publish_raw_event(&envelope(&format!("big-{i}"), 1, 1, vec![hb]))
            .await
            .unwrap();
        broker
            .publish_raw_event(&envelope(&format!("big-{i}"), 1, 2, vec![failed]))
            .await
            .unwrap();
    }
    let body = eventually(Duration::from_secs(30), "50 workers listed", || async {
        let r = reqwest::get(format!("{}/api/workers", c.api.base)).await?;
        let text = r.text().await?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let n = v["workers"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(n == 50, "{n} workers");
        Ok(text)
    })
    .await;
    // Each hostname and version cut to 255 bytes: ~50 x 1 KB, not 50 MB.
    assert!(body.len() < 200_000, "/api/workers is {} bytes", body.len());
    let errors = c.api.get_ok("/api/errors").await.unwrap().to_string();
    assert!(
        errors.len() < 100_000,
        "/api/errors is {} bytes",
        errors.len()
    );
    // Let the dashboards receive a few updates, then look at memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (now, peak) = rss(c.proc.pid());
    assert!(peak < 300 << 20, "peak RSS {} MB", peak >> 20);
    assert!(now < 300 << 20, "RSS {} MB", now >> 20);
    for s in streams {
        s.abort();
    }
}

/// A header table entry `x-deep` holding arrays nested `depth` deep (5
/// bytes a level), the innermost holding a long int.
fn deeply_nested_header(depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 5 * depth + 5);
    out.push(6);
    out.extend(b"x-deep");
    for level in 1..=depth {
        out.push(b'A');
        out.extend((((depth - level) * 5 + 5) as u32).to_be_bytes());
    }
    out.extend([b'I', 0, 0, 0, 7]);
    out
}

#[tokio::test]
async fn headers_nested_thousands_deep_kill_neither_agent_nor_coordinator() {
    // 20 000 levels (100 KB) fit a frame and RabbitMQ relays them to a
    // queue as they are; the AMQP parser recursed per level, and ~1 500
    // overflowed the stack of lapin's io-loop thread: the agent aborted, and
    // every agent after it, as the message went back to the queue.
    // (RabbitMQ 3.10 drops such headers from stream messages: the events
    // stream is checked for a broker that keeps them.)
    let ns = TestNs::new("deep-headers");
    let mut c = spawn_coordinator(&ns, &[]).await.unwrap();
    let mut agents = simulated_agents(&ns, "d1", &["d1-a"]).await;
    wait_workers(&c.api, &["d1-a"], "idle").await;
    let deep = deeply_nested_header(20_000);

    raw_amqp::publish(
        &amqp_url(),
        &ns.names.tasks_exchange(),
        "d1",
        &RawMessage {
            message_id: Some(b"DEEP-1".to_vec()),
            raw_headers: deep.clone(),
            body: b"payload".to_vec(),
            ..RawMessage::default()
        },
    )
    .await
    .unwrap();
    raw_amqp::publish(
        &amqp_url(),
        "",
        &ns.names.events_stream(),
        &RawMessage {
            raw_headers: deep,
            body: submitted("T-deep", "d1").encode().unwrap(),
            ..RawMessage::default()
        },
    )
    .await
    .unwrap();

    // The task is done as any other, and the event is applied: both
    // messages parsed (the headers past the parser's depth limit read as
    // empty, which nothing here reads).
    eventually(Duration::from_secs(20), "both messages handled", || async {
        let t = c.api.get_ok("/api/tasks/DEEP-1").await?;
        anyhow::ensure!(t["status"] == "succeeded", "DEEP-1: {t}");
        let t = c.api.get_ok("/api/tasks/T-deep").await?;
        anyhow::ensure!(t["status"] == "queued", "T-deep: {t}");
        Ok(())
    })
    .await;
    let agent = &mut agents[0];
    assert!(
        agent.proc.child.try_wait().unwrap().is_none(),
        "the agent exited:\n{}",
        agent.proc.log_text()
    );
    assert!(
        c.proc.child.try_wait().unwrap().is_none(),
        "the coordinator exited"
    );
    for (who, log) in [
        ("agent", agent.proc.log_text()),
        ("coordinator", c.proc.log_text()),
    ] {
        assert!(
            !log.contains("reconnecting"),
            "the {who} lost its connection:\n{log}"
        );
    }
    nobody_judged(&c.api, &["d1-a"], Duration::from_secs(2)).await;
}
