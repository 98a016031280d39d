//! Per-stage rate limits against real agents on the real broker: a stage's
//! achieved start rate (counted from the `TaskStarted` events on the stream,
//! by their agents' clocks) stays within 10% of its limit with one agent,
//! with three, and while one joins and another leaves; the limit is set at
//! run time through the API and the CLI; bad input is refused (400 with a
//! JSON message, exit 2), and a `RateLimitSet` from a sender that is not a
//! coordinator changes nothing.

use guildhall_proto::{AgentId, Envelope, Event, RateLimitSet};
use guildhall_tests::*;
use serde_json::Value;
use std::time::Duration;

const TOKEN: &str = "test-token-0123456789abcdef";
const STAGE: &str = "rl";

/// The stage's `rate_limit` object in `/api/stages`.
async fn stage_limit(api: &Api) -> anyhow::Result<Value> {
    let stages = api.get_ok("/api/stages").await?;
    Ok(stages["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == STAGE)
        .map(|s| s["rate_limit"].clone())
        .unwrap_or(Value::Null))
}

/// Waits until the stage's limit is split among exactly `agents`.
async fn wait_shares(api: &Api, agents: &[&str]) {
    eventually(Duration::from_secs(20), "the split", || async {
        let l = stage_limit(api).await?;
        let mut ids: Vec<&str> = l["shares"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["agent"].as_str())
            .collect();
        ids.sort_unstable();
        anyhow::ensure!(ids == agents, "{l}");
        Ok(())
    })
    .await;
}

/// A fast simulated agent (5 ms a task, 4 at once) with a conservative own
/// limit until its share arrives.
async fn agent(ns: &TestNs, id: &str) -> Agent {
    spawn_agent(
        ns,
        id,
        STAGE,
        &[
            "--simulate",
            "median=5ms,spread=0",
            "--concurrency",
            "4",
            "--heartbeat",
            "500ms",
            "--rate-limit",
            "1/s",
        ],
    )
    .await
    .unwrap()
}

/// Start times (agent clocks) of the stage's tasks on the stream, read
/// until an envelope sent after `until_ms` (+1 s) shows up.
async fn start_times(broker: &Broker, until_ms: u64) -> Vec<u64> {
    let mut reader = broker.events().await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let Some(decoded) = reader.next_envelope(Duration::from_secs(3)).await.unwrap() else {
            break;
        };
        let Ok(envelope) = decoded else { continue };
        for e in &envelope.events {
            if let Event::TaskStarted(s) = e
                && s.stage.as_str() == STAGE
            {
                out.push(s.at_ms);
            }
        }
        if envelope.sent_at_ms > until_ms + 1_000 {
            break;
        }
    }
    reader.close().await;
    out
}

fn rate_in(starts: &[u64], from: u64, to: u64) -> f64 {
    let n = starts.iter().filter(|t| (from..to).contains(t)).count();
    n as f64 * 1000.0 / (to - from) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stage_rate_holds_with_one_and_three_agents_and_while_they_come_and_go() {
    let ns = TestNs::exclusive("rate");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage(STAGE).await.unwrap();
    for i in 0..1500 {
        broker
            .publish_task(STAGE, &format!("t{i}"), "x")
            .await
            .unwrap();
    }
    let c = spawn_coordinator(
        &ns,
        &[
            "--api-token",
            TOKEN,
            "--rate-limit",
            "rl=20/s",
            "--queue-poll",
            "200ms",
        ],
    )
    .await
    .unwrap();
    let api = &c.api;

    // One agent: it gets the whole limit.
    let mut a1 = agent(&ns, "a1").await;
    wait_shares(api, &["a1"]).await;
    let w1 = guildhall_broker::now_ms() + 1_000;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let w1 = (w1, w1 + 6_000);

    // Three agents: a third each.
    let _a2 = agent(&ns, "a2").await;
    let _a3 = agent(&ns, "a3").await;
    wait_shares(api, &["a1", "a2", "a3"]).await;
    let w2 = guildhall_broker::now_ms() + 1_000;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let w2 = (w2, w2 + 6_000);

    // One joins, one leaves, inside the window.
    let w3 = guildhall_broker::now_ms();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _a4 = agent(&ns, "a4").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a1.proc.terminate(Duration::from_secs(30)).await.unwrap();
    wait_shares(api, &["a2", "a3", "a4"]).await;
    let now = guildhall_broker::now_ms();
    tokio::time::sleep(Duration::from_millis((w3 + 10_000).saturating_sub(now))).await;
    let w3 = (w3, w3 + 10_000);

    let starts = start_times(&broker, w3.1).await;
    let limit = stage_limit(api).await.unwrap();
    for (name, (from, to)) in [
        ("one agent", w1),
        ("three agents", w2),
        ("join and leave", w3),
    ] {
        let rate = rate_in(&starts, from, to);
        eprintln!("{name}: {rate:.2} tasks/s against 20/s");
        assert!(
            (18.0..=22.0).contains(&rate),
            "{name}: {rate:.2}/s is not within 10% of 20/s; {limit}"
        );
    }
    assert_eq!(limit["limit"], "20/s");
    let achieved = limit["achieved_per_second"].as_f64().unwrap();
    assert!((15.0..=25.0).contains(&achieved), "{limit}");
    let m = api.metrics().await.unwrap();
    assert_eq!(
        m.value("guildhall_stage_rate_limit_per_second", &[("stage", STAGE)]),
        Some(20.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_is_changed_at_run_time_and_bad_input_is_refused() {
    let ns = TestNs::new("rate-api");
    let broker = Broker::connect(&ns).await.unwrap();
    broker.declare_stage(STAGE).await.unwrap();
    let c = spawn_coordinator(&ns, &["--api-token", TOKEN])
        .await
        .unwrap();
    let api = &c.api;
    let control = &c.api.with_token(TOKEN);
    let _a1 = agent(&ns, "a1").await;
    eventually(Duration::from_secs(20), "the stage known", || async {
        anyhow::ensure!(
            stage_limit(api).await.is_ok()
                && api.get_ok("/api/stages").await?["stages"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["name"] == STAGE)),
            "not yet"
        );
        Ok(())
    })
    .await;
    let path = format!("/api/stages/{STAGE}/rate-limit");

    // Without the token: refused.
    let (status, body) = api.put_raw(&path, r#"{"limit":"5/s"}"#).await.unwrap();
    assert_eq!(status, 401, "{body}");

    // Hostile bodies and names: 400 with a JSON message, nothing set.
    for (path, body) in [
        (path.as_str(), r#"{"limit":"0/s"}"#),
        (&path, r#"{"limit":"-3/s"}"#),
        (&path, r#"{"limit":"fast"}"#),
        (&path, r#"{"limit":50}"#),
        (&path, r#"{"limit":"99999999999999999999/s"}"#),
        (&path, r#"{"limit":"5/s","extra":true}"#),
        (&path, r#"{}"#),
        (&path, r#"[1]"#),
        (&path, "not json"),
        ("/api/stages/no-such-stage/rate-limit", r#"{"limit":"5/s"}"#),
        ("/api/stages/bad%20name/rate-limit", r#"{"limit":"5/s"}"#),
    ] {
        let (status, answer) = control.put_raw(path, body).await.unwrap();
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    assert_eq!(stage_limit(api).await.unwrap(), Value::Null);

    // Set, seen in the view with its split, then lifted.
    let (status, body) = control
        .put_raw(&path, r#"{"limit":"30/min"}"#)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let l = stage_limit(api).await.unwrap();
    assert_eq!(l["limit"], "30/min", "{l}");
    wait_shares(api, &["a1"]).await;
    let (status, body) = control.put_raw(&path, r#"{"limit":null}"#).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(stage_limit(api).await.unwrap(), Value::Null);

    // A RateLimitSet from an agent's id on the stream is not obeyed.
    let forged = Envelope {
        sender: AgentId::new("a1").unwrap(),
        incarnation: 7,
        seq: 1,
        sent_at_ms: guildhall_broker::now_ms(),
        events: vec![Event::RateLimitSet(RateLimitSet {
            at_ms: guildhall_broker::now_ms(),
            stage: TestNs::stage(STAGE),
            limit: Some("1/h".parse().unwrap()),
            by: "forger".into(),
        })],
    };
    broker
        .publish_raw_event(&forged.encode().unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stage_limit(api).await.unwrap(), Value::Null);

    // The CLI: set, lift, and refuse with exit 2.
    let base = ["--api-url", api.base.as_str(), "--api-token", TOKEN];
    let run = |extra: &[&str]| {
        let mut args = vec!["rate-limit"];
        args.extend(base);
        args.extend(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run_guildhall(&refs).await
        }
    };
    let out = run(&[STAGE, "50/s"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stage_limit(api).await.unwrap()["limit"], "50/s");
    let out = run(&[STAGE, "off"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stage_limit(api).await.unwrap(), Value::Null);
    for bad in [
        [STAGE, "0/s"],
        [STAGE, "soon"],
        ["no-such-stage", "5/s"],
        ["a b", "5/s"],
    ] {
        let out = run(&bad).await;
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{bad:?}: {err}");
    }

    // A bad --rate-limit flag: one line, exit 2, before anything starts.
    for bad in ["rl", "rl=0/s", "rl=fast", "a b=5/s"] {
        let out = run_guildhall(&["serve", "--namespace", ns.name(), "--rate-limit", bad]).await;
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{bad}: {err}");
        assert!(err.contains("--rate-limit"), "{bad}: {err}");
    }
}
