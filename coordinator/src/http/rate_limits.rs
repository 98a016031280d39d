//! Stage rate limits over HTTP: `PUT /api/stages/{stage}/rate-limit` with
//! `{"limit": "50/s"}` (or `null` to lift it), a control route; their
//! gauges before a scrape. (The limit, split and achieved start rate of each
//! stage are the core's stage view: `GET /api/stages` and the dashboard's
//! `stages` events.)
//!
//! Answers of the PUT: 200 once the core applied the limit; 400 (JSON
//! `{"error": ...}`) for a bad stage name, an unknown stage, a body that is
//! not `{"limit": RATE|null}`, or a rate that is 0 or unparsable; 503 when
//! the broker does not take the event; 504 when the broker does not confirm
//! it within `--broker-timeout`, or it was written but not read back within
//! 5 s (it applies when it is).

use super::error::ApiError;
use crate::serve::App;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use guildhall_core::core::scheduling::rate_limits::RateLimitView;
use guildhall_proto::{Rate, Stage};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// How long the PUT waits for its event to be read back and applied.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// `PUT /api/stages/{stage}/rate-limit`.
pub async fn put(
    State(app): State<Arc<App>>,
    Path(stage): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let stage = Stage::new(stage).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let limit = parse_body(&body)?;
    if !app.core().knows_stage(stage.as_str()) {
        return Err(ApiError::bad_request(format!(
            "unknown stage '{stage}' (a stage is known once a task or an agent named it)"
        )));
    }
    let event = crate::serve::rate_limits::event(stage.clone(), limit, "api");
    super::write::confirmed(
        &app,
        app.write_events(vec![event]),
        "cannot write the rate limit",
        "the broker did not confirm the rate limit in time: it may or may not apply; look with GET /api/stages",
    )
    .await?;
    if !super::write::applied(&app, APPLY_WAIT, |core| {
        core.stage_rate_limit(&stage) == limit
    })
    .await
    {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "the rate limit was written to the events stream but not read back yet: it applies when it is",
        ));
    }
    tracing::info!(%stage, limit = ?limit.map(|l| l.to_string()), "stage rate limit set through the API");
    Ok(Json(json!({
        "ok": true,
        "stage": stage.as_str(),
        "limit": limit.map(|l| l.to_string()),
        "limit_per_second": limit.map(Rate::per_sec),
    })))
}

/// `{"limit": "50/s"}` or `{"limit": null}`, nothing else.
fn parse_body(body: &[u8]) -> Result<Option<Rate>, ApiError> {
    let value: Value = super::body::parse_bytes(body)?;
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object like {\"limit\": \"50/s\"} or {\"limit\": null}",
        ));
    };
    if let Some(key) = object.keys().find(|k| k.as_str() != "limit") {
        let key: String = key.chars().take(40).collect();
        return Err(ApiError::bad_request(format!(
            "unknown field '{key}' (expected: limit)"
        )));
    }
    match object.get("limit") {
        None => Err(ApiError::bad_request("missing field 'limit'")),
        Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse::<Rate>()
            .map(Some)
            .map_err(|e| ApiError::bad_request(e.to_string())),
        Some(other) => Err(ApiError::bad_request(format!(
            "limit must be a string like \"50/s\", \"30/min\" or \"1/h\", or null (got {})",
            other.to_string().chars().take(40).collect::<String>()
        ))),
    }
}

/// Sets the rate-limit gauges from `limits` (stages without a limit have
/// no series).
pub fn refresh_metrics(app: &App, limits: &[RateLimitView]) {
    let m = &app.metrics;
    m.stage_rate_limit.reset();
    m.stage_rate_achieved.reset();
    for l in limits {
        m.stage_rate_limit
            .with_label_values(&[l.stage.as_str()])
            .set(l.limit_per_second);
        m.stage_rate_achieved
            .with_label_values(&[l.stage.as_str()])
            .set(l.achieved_per_second);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_support::{Sim, st};
    use guildhall_proto::{Event, Hello, RateLimitSet, WorkerMode};

    /// The stage view is both `GET /api/stages` and the dashboard's
    /// `stages` event (sent as this very JSON): each carries every stage's
    /// limit, `null` for a stage without one.
    #[test]
    fn the_stage_view_carries_each_stage_s_limit() {
        let mut sim = Sim::new();
        for (agent, stage) in [("a1", "limited"), ("a2", "free")] {
            let hello = Event::Hello(Box::new(Hello {
                at_ms: sim.now,
                version: "v".into(),
                stage: st(stage),
                next: None,
                stages: vec![st(stage)],
                concurrency: 2,
                heartbeat_ms: 1000,
                hostname: "h".into(),
                pid: 1,
                mode: WorkerMode::Simulated,
                supervised: false,
            }));
            sim.send(agent, vec![hello]);
        }
        let set = Event::RateLimitSet(RateLimitSet {
            at_ms: sim.now,
            stage: st("limited"),
            limit: Some("5/s".parse().expect("a rate")),
            by: "test".into(),
        });
        sim.send("coordinator-1", vec![set]);
        let body = serde_json::to_value(sim.core.stages_view(sim.now)).expect("serialises");
        let stage = |name: &str| {
            body["stages"]
                .as_array()
                .expect("stages")
                .iter()
                .find(|s| s["name"] == name)
                .cloned()
                .expect(name)
        };
        let limited = stage("limited");
        assert_eq!(limited["rate_limit"]["limit"], "5/s", "{limited}");
        assert_eq!(limited["rate_limit"]["limit_per_second"], 5.0);
        assert_eq!(limited["rate_limit"]["by"], "test");
        assert_eq!(limited["rate_limit"]["shares"][0]["agent"], "a1");
        let free = stage("free");
        assert_eq!(free.get("rate_limit"), Some(&Value::Null), "{free}");
    }

    #[test]
    fn the_body_is_a_rate_or_null_and_nothing_else() {
        assert_eq!(
            parse_body(br#"{"limit":"50/s"}"#).ok(),
            Some(Some("50/s".parse().expect("rate")))
        );
        assert_eq!(parse_body(br#"{"limit":null}"#).ok(), Some(None));
        for bad in [
            &br#"{"limit":"0/s"}"#[..],
            br#"{"limit":"fast"}"#,
            br#"{"limit":50}"#,
            br#"{"limit":"-1/s"}"#,
            br#"{"limit":"9999999999999999999/s"}"#,
            br#"{}"#,
            br#"{"limit":"5/s","x":1}"#,
            br#"[]"#,
            br#"not json"#,
        ] {
            let e = parse_body(bad).expect_err(&String::from_utf8_lossy(bad));
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }
}
