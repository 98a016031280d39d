//! Scaling a stage by hand (issue 21): `POST /api/stages/{stage}/scale`
//! with `{"delta": 1}` (or `-1`, any whole number from -1000 to 1000 but 0)
//! or `{"workers": 5}` (0 to [`MAX_WORKERS`]), a control route (the token
//! when there is one). It goes through the configured actuator
//! (`--scale-webhook`, `--scale-command`, or `--scale-dry-run` to only log
//! it) at once, without waiting for `--scale-interval`; the planner's next
//! change of recommendation for the stage replaces it, as any autoscaler's
//! would.
//!
//! Answers: 202 with `{stage, from, to, actuator, dry_run}` once the
//! actuator has it (it runs the command or calls the webhook off the
//! request; its outcome is logged and counted in
//! `guildhall_scale_actions_total`); 400 (JSON `{"error": ...}`) for a bad
//! stage name or body, or a count out of range; 404 for a stage the
//! coordinator does not know; 409 when no actuator is configured.
//! `GET /api/scaling` lists the last [`KEPT`] manual requests (`manual`).

use super::error::ApiError;
use crate::serve::App;
use crate::serve::actuate::ScaleDecision;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use guildhall_broker::now_ms;
use guildhall_proto::Stage;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Largest worker count a request may ask for.
pub const MAX_WORKERS: u32 = 10_000;
/// Largest step of a `delta`, either way.
pub const MAX_DELTA: i64 = 1_000;
/// Manual requests kept for `GET /api/scaling`.
pub const KEPT: usize = 50;

/// One manual scaling request, as `GET /api/scaling` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ManualScale {
    /// When it was made (ms since the epoch).
    pub at_ms: u64,
    /// The stage.
    pub stage: String,
    /// Live workers of the stage when it was made.
    pub from: u32,
    /// Workers asked for.
    pub to: u32,
    /// Whether the actuator only logs (`--scale-dry-run`).
    pub dry_run: bool,
}

/// The last [`KEPT`] manual requests, newest last.
#[derive(Debug, Default)]
pub struct ManualScales(Mutex<VecDeque<ManualScale>>);

impl ManualScales {
    fn record(&self, entry: ManualScale) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() == KEPT {
            list.pop_front();
        }
        list.push_back(entry);
    }

    /// The requests kept, oldest first.
    pub fn list(&self) -> Vec<ManualScale> {
        let list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().cloned().collect()
    }
}

/// What the body asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// This many more (or fewer) than the live workers.
    Delta(i64),
    /// This many.
    Workers(u32),
}

/// `POST /api/stages/{stage}/scale`.
pub async fn scale(
    State(app): State<Arc<App>>,
    Path(stage): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let stage = Stage::new(stage).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let ask = parse_body(&body)?;
    let from = {
        let core = app.core();
        if !core.knows_stage(stage.as_str()) {
            return Err(ApiError::not_found(format!(
                "unknown stage '{stage}' (a stage is known once a task or an agent named it)"
            )));
        }
        let live = core
            .workers_view(now_ms())
            .into_iter()
            .filter(|w| w.stage == stage.as_str() && !matches!(w.status, "dead" | "stopped"))
            .count();
        u32::try_from(live).unwrap_or(u32::MAX)
    };
    let to = target(from, ask)?;
    let Some(actuator) = &app.actuator else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no actuator is configured: start the coordinator with --scale-command or \
             --scale-webhook (or --scale-dry-run to only log scaling)",
        ));
    };
    let dry_run = app.dry_run;
    actuator.decide(ScaleDecision {
        stage: stage.clone(),
        from,
        to,
        reason: format!("by hand, through the API ({from} -> {to})"),
        manual: true,
    });
    app.manual_scales.record(ManualScale {
        at_ms: now_ms(),
        stage: stage.to_string(),
        from,
        to,
        dry_run,
    });
    tracing::info!(%stage, from, to, dry_run, "manual scaling asked through the API");
    let actuator = match (&app.actuator_kind, dry_run) {
        (_, true) => "dry_run",
        (kind, false) => kind,
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "ok": true,
            "stage": stage.as_str(),
            "from": from,
            "to": to,
            "actuator": actuator,
            "dry_run": dry_run,
        })),
    ))
}

/// `{"delta": N}` or `{"workers": N}`, exactly one, nothing else.
fn parse_body(body: &[u8]) -> Result<Ask, ApiError> {
    const SHAPE: &str = "the body must be {\"delta\": N} (N from -1000 to 1000, not 0) or {\"workers\": N} (N from 0 to 10000)";
    let value: Value = super::body::parse_bytes(body)?;
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request(SHAPE));
    };
    if let Some(key) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "delta" | "workers"))
    {
        let key: String = key.chars().take(40).collect();
        return Err(ApiError::bad_request(format!(
            "unknown field '{key}': {SHAPE}"
        )));
    }
    match (object.get("delta"), object.get("workers")) {
        (Some(delta), None) => match delta.as_i64() {
            Some(d) if d != 0 && d.abs() <= MAX_DELTA => Ok(Ask::Delta(d)),
            _ => Err(ApiError::bad_request(format!(
                "delta must be a whole number from -{MAX_DELTA} to {MAX_DELTA}, not 0 (got {})",
                short(delta)
            ))),
        },
        (None, Some(workers)) => match workers.as_u64() {
            Some(n) if n <= u64::from(MAX_WORKERS) => Ok(Ask::Workers(n as u32)),
            _ => Err(ApiError::bad_request(format!(
                "workers must be a whole number from 0 to {MAX_WORKERS} (got {})",
                short(workers)
            ))),
        },
        _ => Err(ApiError::bad_request(SHAPE)),
    }
}

/// A JSON value cut to 40 characters, for an error message.
fn short(value: &Value) -> String {
    value.to_string().chars().take(40).collect()
}

/// The worker count `ask` means for a stage with `from` live workers.
fn target(from: u32, ask: Ask) -> Result<u32, ApiError> {
    match ask {
        Ask::Workers(n) => Ok(n),
        Ask::Delta(d) => {
            let to = i64::from(from) + d;
            if to < 0 {
                return Err(ApiError::bad_request(format!(
                    "the stage has {from} live worker{}: it cannot lose {}",
                    if from == 1 { "" } else { "s" },
                    -d
                )));
            }
            u32::try_from(to)
                .ok()
                .filter(|n| *n <= MAX_WORKERS)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "{from} live workers and {d} more is over {MAX_WORKERS}"
                    ))
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Ask, String> {
        parse_body(s.as_bytes()).map_err(|e| e.message)
    }

    #[test]
    fn bodies_are_a_delta_or_a_count_and_nothing_else() {
        assert_eq!(parse(r#"{"delta": 1}"#), Ok(Ask::Delta(1)));
        assert_eq!(parse(r#"{"delta": -3}"#), Ok(Ask::Delta(-3)));
        assert_eq!(parse(r#"{"workers": 0}"#), Ok(Ask::Workers(0)));
        assert_eq!(parse(r#"{"workers": 10000}"#), Ok(Ask::Workers(10_000)));
        for bad in [
            r#"{"delta": 0}"#,
            r#"{"delta": 1001}"#,
            r#"{"delta": 1.5}"#,
            r#"{"delta": "1"}"#,
            r#"{"delta": null}"#,
            r#"{"workers": -1}"#,
            r#"{"workers": 10001}"#,
            r#"{"workers": 1e3}"#,
            r#"{"delta": 1, "workers": 2}"#,
            r#"{"delta": 1, "by": "me"}"#,
            r#"{}"#,
            r#"[1]"#,
            r#"1"#,
            r#"{"delta": 1"#,
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad} was taken");
        }
        let long = format!(r#"{{"{}": 1}}"#, "k".repeat(500));
        let err = parse(&long).unwrap_err();
        assert!(err.len() < 300, "{err}");
    }

    #[test]
    fn a_delta_counts_from_the_live_workers_within_bounds() {
        assert_eq!(target(2, Ask::Delta(1)).ok(), Some(3));
        assert_eq!(target(2, Ask::Delta(-2)).ok(), Some(0));
        assert!(target(2, Ask::Delta(-3)).is_err());
        assert!(target(MAX_WORKERS, Ask::Delta(1)).is_err());
        assert_eq!(target(7, Ask::Workers(1)).ok(), Some(1));
    }
}
