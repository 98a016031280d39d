//! Scaling by hand (issue 21): `POST /api/stages/{stage}/scale` and the
//! dashboard's "Scale +1 / -1" go through the configured actuator at once
//! (not after `--scale-interval`), behind the token, recorded in
//! `GET /api/scaling`; without an actuator, a clear 409; malformed or
//! forged requests get a 4xx JSON error.

use crate::browser::find;
use guildhall_tests::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const TOKEN: &str = "manual-scale-token-0123";

/// A coordinator with a scale command writing `<stage>=<workers>` lines to
/// `out` and a webhook, an hour between automatic actions, the token; and
/// one agent on stage `work` (so the stage has one live worker).
async fn setup(ns: &TestNs, out: &Path, hook: &WebhookSink) -> (Coordinator, Agent) {
    let command = format!("echo {{stage}}={{workers}} >> {}", out.display());
    let c = spawn_coordinator(
        ns,
        &[
            "--scale-command",
            &command,
            "--scale-webhook",
            &hook.url,
            "--scale-interval",
            "1h",
            "--api-token",
            TOKEN,
        ],
    )
    .await
    .unwrap();
    let agent = spawn_agent(ns, "s1", "work", &["--exec", "cat", "--heartbeat", "500ms"])
        .await
        .unwrap();
    let api = c.api.with_token(TOKEN);
    eventually(Duration::from_secs(20), "the agent listed", || async {
        let w = api.get_ok("/api/workers/s1").await?;
        anyhow::ensure!(w["status"] == "idle", "{w}");
        Ok(())
    })
    .await;
    (c, agent)
}

/// Waits until the scale command wrote `line` to `out`.
async fn wait_for_line(out: &Path, line: &str, what: &str) {
    eventually(Duration::from_secs(15), what, || async {
        let written = lines(out);
        anyhow::ensure!(written.iter().any(|l| l == line), "{written:?}");
        Ok(())
    })
    .await;
}

/// The lines the scale command wrote so far.
fn lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_by_hand_goes_through_the_actuator_at_once() {
    let ns = TestNs::new("mscale");
    let hook = WebhookSink::start().await;
    let out = ns.log_dir.join("scaled.txt");
    let (c, _agent) = setup(&ns, &out, &hook).await;
    let api = c.api.with_token(TOKEN);
    let path = "/api/stages/work/scale";

    let (status, body) = api.post_raw(path, r#"{"delta": 1}"#).await.unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (
            &body["from"],
            &body["to"],
            &body["actuator"],
            &body["dry_run"]
        ),
        (
            &json!(1),
            &json!(2),
            &json!("command+webhook"),
            &json!(false)
        ),
        "{body}"
    );
    wait_for_line(&out, "work=2", "the command ran").await;
    // The next one is not held back by --scale-interval (1 h).
    let (status, body) = api.post_raw(path, r#"{"workers": 5}"#).await.unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["to"], 5, "{body}");
    wait_for_line(&out, "work=5", "the command ran again").await;
    eventually(Duration::from_secs(10), "the webhook called", || async {
        let posted: Vec<Value> = hook.received();
        anyhow::ensure!(
            posted
                .iter()
                .any(|b| b["stage"] == "work" && b["to"] == 5 && b["from"] == 1),
            "{posted:?}"
        );
        Ok(())
    })
    .await;
    // The command line: a step, then a bad count (status 2, one line).
    let base = c.api.base.clone();
    let out_cli = run_guildhall(&[
        "scale",
        "work",
        "+2",
        "--api-url",
        &base,
        "--api-token",
        TOKEN,
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out_cli.stdout);
    assert!(out_cli.status.success(), "{out_cli:?}");
    assert_eq!(
        stdout.trim(),
        "work: 1 -> 3 workers asked (through the command+webhook)"
    );
    let bad = run_guildhall(&[
        "scale",
        "work",
        "plenty",
        "--api-url",
        &base,
        "--api-token",
        TOKEN,
    ])
    .await;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim().lines().count(),
        1
    );
    // Recorded and counted.
    let scaling = api.get_ok("/api/scaling").await.unwrap();
    let manual = scaling["manual"].as_array().cloned().unwrap_or_default();
    let asked: Vec<(Value, Value)> = manual
        .iter()
        .map(|m| (m["stage"].clone(), m["to"].clone()))
        .collect();
    assert_eq!(
        asked,
        vec![
            (json!("work"), json!(2)),
            (json!("work"), json!(5)),
            (json!("work"), json!(3))
        ],
        "{scaling}"
    );
    let m = api.metrics().await.unwrap();
    assert!(
        m.value("guildhall_scale_actions_total", &[("outcome", "done")]) >= Some(2.0),
        "{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_forged_scaling_requests_are_refused() {
    let ns = TestNs::new("mscalebad");
    let hook = WebhookSink::start().await;
    let out = ns.log_dir.join("scaled.txt");
    let (c, _agent) = setup(&ns, &out, &hook).await;
    let api = c.api.with_token(TOKEN);
    let path = "/api/stages/work/scale";

    // No token, a wrong one.
    let (status, body) = c.api.post_raw(path, r#"{"delta": 1}"#).await.unwrap();
    assert_eq!(status, 401, "{body}");
    let wrong = c.api.with_token("not-the-token-at-all");
    let (status, _) = wrong.post_raw(path, r#"{"delta": 1}"#).await.unwrap();
    assert_eq!(status, 401);
    // Bad bodies.
    for bad in [
        r#"{"delta": 0}"#,
        r#"{"delta": 1000000}"#,
        r#"{"delta": -5}"#,
        r#"{"delta": 1.5}"#,
        r#"{"delta": "+1"}"#,
        r#"{"workers": -1}"#,
        r#"{"workers": 99999999999}"#,
        r#"{"workers": 2, "delta": 1}"#,
        r#"{"delta": 1, "stage": "other"}"#,
        r#"{}"#,
        r#"[]"#,
        r#"{"delta": 1"#,
    ] {
        let (status, body) = api.post_raw(path, bad).await.unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string(), "{bad}: {body}");
    }
    // Bad and unknown stages.
    let (status, body) = api
        .post_raw("/api/stages/no%20such/scale", r#"{"delta": 1}"#)
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = api
        .post_raw("/api/stages/nosuch/scale", r#"{"delta": 1}"#)
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    // Not JSON, too big.
    let plain = reqwest::Client::new()
        .post(format!("{}{path}", c.api.base))
        .bearer_auth(TOKEN)
        .header("content-type", "text/plain")
        .body(r#"{"delta": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status().as_u16(), 415);
    let big = format!(r#"{{"delta": 1, "pad": "{}"}}"#, "x".repeat(100_000));
    let (status, _) = api.post_raw(path, &big).await.unwrap();
    assert_eq!(status, 413);
    // Nothing reached the actuator.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !lines(&out).iter().any(|l| l.starts_with("work=")),
        "{:?}",
        lines(&out)
    );
    let scaling = api.get_ok("/api/scaling").await.unwrap();
    assert_eq!(scaling["manual"], json!([]), "{scaling}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_actuator_scaling_by_hand_is_a_clear_409() {
    let ns = TestNs::new("mscalenone");
    let c = spawn_coordinator(&ns, &[]).await.unwrap();
    let _agent = spawn_agent(&ns, "n1", "work", &["--exec", "cat"])
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "the agent listed", || async {
        c.api.get_ok("/api/workers/n1").await.map(drop)
    })
    .await;
    let (status, body) = c
        .api
        .post_raw("/api/stages/work/scale", r#"{"delta": 1}"#)
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("--scale-command"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_scales_a_stage_with_a_click() {
    let ns = TestNs::new("mscaleweb");
    let hook = WebhookSink::start().await;
    let out = ns.log_dir.join("scaled.txt");
    let (c, _agent) = setup(&ns, &out, &hook).await;
    let browser = spawn_browser(&ns).await.unwrap();
    let client = &browser.client;
    // The token is stored as the page stores it, so the click needs no dialog.
    client.goto(&c.api.base).await.unwrap();
    client
        .execute(
            &format!("sessionStorage.setItem('guildhall-token', '{TOKEN}'); location.reload();"),
            vec![],
        )
        .await
        .unwrap();
    let plus = "button[data-stage-action='scale'][data-delta='1'][data-stage='work']";
    find(client, plus).await.click().await.unwrap();
    wait_for_line(&out, "work=2", "the click scaled").await;
    let toast = find(client, ".toast").await.text().await.unwrap();
    assert!(toast.contains("1 \u{2192} 2"), "{toast}");
    // Listed under "Scaled by hand" in the pipeline view (fed by /api/events).
    client
        .goto(&format!("{}/#pipeline", c.api.base))
        .await
        .unwrap();
    let row = find(client, "#manual-scale-table .manual-scale-row").await;
    let text = row.text().await.unwrap();
    assert!(
        text.contains("work") && text.contains("1 \u{2192} 2"),
        "{text}"
    );
}
