//! `/api/schedules`: cron schedules (list, create or replace, remove, pause,
//! resume).
//!
//! A change is written to the events stream as `ScheduleChanged` (confirmed)
//! and answered once the core has read it back and applied it (200, or 201
//! for a new schedule), or with 202 if it has not within
//! [`APPLY_WAIT`] (it is in the stream: it will be). Bad input is a 400 with
//! `{"error": ...}`; an unknown schedule a 404.

use super::error::ApiError;
use crate::serve::App;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use guildhall_broker::now_ms;
use guildhall_core::core::scheduling::schedules::{MAX_SCHEDULES, Parsed};
use guildhall_proto::{
    Event, MAX_SCHEDULE_PAYLOAD, Missed, Priority, ScheduleChanged, ScheduleSpec, Stage,
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

type AppState = State<Arc<App>>;

/// Longest cron expression accepted.
pub const MAX_CRON_LEN: usize = 200;

/// Largest body of `POST /api/schedules` (a payload at its limit as base64,
/// or as an escaped JSON string).
pub const MAX_SCHEDULE_BODY: usize = 2 * MAX_SCHEDULE_PAYLOAD + 4096;

/// How long a change waits for the core to apply it before answering 202.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Who a change is written by.
const BY: &str = "api";

/// Body of `POST /api/schedules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleBody {
    /// The schedule's name (letters, digits, `_`, `-`).
    name: String,
    /// Cron expression: 5 fields, or 6 with seconds first.
    cron: String,
    /// The stage each tick's task goes to.
    stage: String,
    /// The payload: a string as its UTF-8 bytes, any other JSON value as its
    /// JSON text.
    payload: Option<Value>,
    /// The payload as base64, for binary data.
    payload_base64: Option<String>,
    /// IANA time zone (default UTC).
    timezone: Option<String>,
    /// Priority of each task, 0-9 (default 0).
    priority: Option<Value>,
    /// `run-all` (default), `run-once`, `skip`.
    missed: Option<String>,
    /// Create it paused.
    #[serde(default)]
    paused: bool,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

/// Checks a body and makes the schedule it describes.
fn spec_of(body: ScheduleBody) -> Result<(Stage, ScheduleSpec), ApiError> {
    let name = Stage::new(body.name).map_err(|e| bad(format!("schedule name: {e}")))?;
    let stage = Stage::new(body.stage).map_err(|e| bad(e.to_string()))?;
    if body.cron.len() > MAX_CRON_LEN {
        return Err(bad(format!(
            "cron expression longer than {MAX_CRON_LEN} characters"
        )));
    }
    let timezone = body.timezone.unwrap_or_else(|| "UTC".into());
    let priority = match body.priority {
        None => Priority::DEFAULT,
        Some(v) => super::body::priority(&v).ok_or_else(|| {
            bad(format!(
                "invalid priority {v}: a priority is a whole number from 0 to 9, higher first"
            ))
        })?,
    };
    let missed = match body.missed {
        None => Missed::default(),
        Some(m) => m.parse::<Missed>().map_err(bad)?,
    };
    Parsed::new(&body.cron, &timezone).map_err(|e| bad(e.to_string()))?;
    let payload = match (body.payload, body.payload_base64) {
        (Some(_), Some(_)) => return Err(bad("give payload or payload_base64, not both")),
        (Some(Value::String(s)), None) => s.into_bytes(),
        (Some(v), None) => serde_json::to_vec(&v).map_err(|e| bad(e.to_string()))?,
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| bad(format!("payload_base64 is not valid base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    if payload.len() > MAX_SCHEDULE_PAYLOAD {
        return Err(bad(format!(
            "payload of {} bytes exceeds a schedule's {MAX_SCHEDULE_PAYLOAD}-byte limit",
            payload.len()
        )));
    }
    Ok((
        name,
        ScheduleSpec {
            cron: body.cron.trim().to_owned(),
            timezone,
            stage,
            payload,
            priority,
            missed,
            paused: body.paused,
        },
    ))
}

/// Writes the change and waits for the core to apply it; the status to
/// answer with (`applied`, or 202 if not yet).
async fn change(app: &App, name: &Stage, spec: Option<ScheduleSpec>) -> Result<bool, ApiError> {
    let at_ms = now_ms();
    let removing = spec.is_none();
    let event = Event::ScheduleChanged(Box::new(ScheduleChanged {
        at_ms,
        name: name.clone(),
        spec,
        by: BY.into(),
    }));
    super::write::confirmed(
        app,
        app.write_events(vec![event]),
        "",
        "the broker did not confirm the change in time: it may or may not apply; look with GET /api/schedules",
    )
    .await?;
    Ok(super::write::applied(app, APPLY_WAIT, |core| {
        match core.schedule_spec(name.as_str()) {
            None => removing,
            Some((_, changed_at)) => !removing && changed_at >= at_ms,
        }
    })
    .await)
}

fn answer(app: &App, name: &Stage, applied: bool, created: bool) -> Response {
    let view = app.core().schedule(name.as_str(), now_ms());
    let status = match (applied, created) {
        (false, _) => StatusCode::ACCEPTED,
        (true, true) => StatusCode::CREATED,
        (true, false) => StatusCode::OK,
    };
    (
        status,
        Json(json!({
            "name": name.as_str(),
            "applied": applied,
            "schedule": view,
        })),
    )
        .into_response()
}

/// `GET /api/schedules`: every schedule with its next ticks.
pub async fn list(State(app): AppState) -> Json<Value> {
    let (dropped, refused) = app.core().schedule_counters();
    let schedules = app.core().schedules(now_ms());
    Json(json!({
        "schedules": schedules,
        "missed_ticks_dropped": dropped,
        "events_refused": refused,
    }))
}

fn known(app: &App, name: String) -> Result<(Stage, ScheduleSpec), ApiError> {
    let name = Stage::new(name).map_err(|e| bad(format!("schedule name: {e}")))?;
    let spec = app
        .core()
        .schedule_spec(name.as_str())
        .map(|(s, _)| s.clone())
        .ok_or_else(|| ApiError::not_found(format!("no schedule '{name}'")))?;
    Ok((name, spec))
}

/// `GET /api/schedules/{name}`.
pub async fn one(State(app): AppState, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let (name, _) = known(&app, name)?;
    let view = app.core().schedule(name.as_str(), now_ms());
    Ok(Json(json!(view)))
}

/// `POST /api/schedules`: create or replace a schedule.
pub async fn upsert(
    State(app): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: ScheduleBody = super::body::parse(body)?;
    let (name, spec) = spec_of(body)?;
    let (exists, count) = {
        let core = app.core();
        (
            core.schedule_spec(name.as_str()).is_some(),
            core.schedule_count(),
        )
    };
    if !exists && count >= MAX_SCHEDULES {
        return Err(bad(format!(
            "there are {count} schedules already, the most a namespace holds ({MAX_SCHEDULES})"
        )));
    }
    let applied = change(&app, &name, Some(spec)).await?;
    tracing::info!(schedule = %name, "schedule set");
    Ok(answer(&app, &name, applied, !exists))
}

/// `DELETE /api/schedules/{name}`.
pub async fn remove(State(app): AppState, Path(name): Path<String>) -> Result<Response, ApiError> {
    let (name, _) = known(&app, name)?;
    let applied = change(&app, &name, None).await?;
    tracing::info!(schedule = %name, "schedule removed");
    let status = if applied {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        Json(json!({"name": name.as_str(), "removed": true, "applied": applied})),
    )
        .into_response())
}

/// `POST /api/schedules/{name}/pause` and `.../resume`.
pub async fn action(
    State(app): AppState,
    Path((name, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        other => {
            return Err(ApiError::not_found(format!(
                "no schedule action '{}' (one of: pause, resume)",
                other.chars().take(40).collect::<String>()
            )));
        }
    };
    let (name, mut spec) = known(&app, name)?;
    if spec.paused == paused {
        return Ok(answer(&app, &name, true, false));
    }
    spec.paused = paused;
    let applied = change(&app, &name, Some(spec)).await?;
    tracing::info!(schedule = %name, paused, "schedule {action}d");
    Ok(answer(&app, &name, applied, false))
}
