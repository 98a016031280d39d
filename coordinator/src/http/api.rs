//! Handlers of the JSON API.

use super::error::ApiError;
use super::redact::{self, ReadScope};
use crate::core::query::TaskFilter;
use crate::core::tasks::TaskStatus;
use crate::core::views::{TaskView, WorkerView};
use crate::serve::App;
use crate::submit::SubmitError;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use guildhall_broker::now_ms;
use guildhall_proto::{AgentId, Stage, TaskId};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

type AppState = State<Arc<App>>;

/// Default and largest page of `GET /api/tasks`.
pub(super) const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;

pub async fn healthz(State(app): AppState) -> Response {
    let overview = app.core().overview();
    let ingest = app.health.ingest_connected.load(Ordering::Relaxed);
    let started = app.health.ingest_started.load(Ordering::Relaxed);
    let (status, text) = match (ingest, started) {
        (true, _) => (StatusCode::OK, "ok"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        (false, true) => (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable"),
    };
    let body = json!({
        "status": text,
        "namespace": app.names.namespace().as_str(),
        "coordinator": app.id.as_str(),
        "version": env!("CARGO_PKG_VERSION"),
        "broker_connected": ingest,
        "management_api": app.health.management_ok.load(Ordering::Relaxed),
        "leader": app.leadership.acting(),
        "epoch": app.leadership.epoch(),
        "core": overview,
    });
    (status, Json(body)).into_response()
}

/// `GET /api/cluster` (issue 20): this coordinator's part in the
/// leadership, and the leader the events stream names.
pub async fn cluster(State(app): AppState) -> Json<Value> {
    let leader = app.core().leader().cloned();
    Json(json!({
        "coordinator": app.id.as_str(),
        "leading": app.leadership.leading(),
        "acting": app.leadership.acting(),
        "epoch": app.leadership.epoch(),
        "takeovers": app.leadership.takeovers.load(Ordering::Relaxed),
        "leader": leader.map(|l| json!({
            "id": l.id.as_str(),
            "epoch": l.epoch,
            "since_ms": l.since_ms,
        })),
    }))
}

/// Liveness for an orchestrator: answers while the HTTP server runs and the
/// core's lock can be taken, whatever the broker is doing (a lost broker is
/// `/healthz`'s 503, which a restart would not cure).
pub async fn livez(State(app): AppState) -> Json<Value> {
    let workers = app.core().overview();
    Json(json!({ "status": "ok", "core": workers }))
}

pub async fn metrics(State(app): AppState) -> Response {
    // Under the lock only what must be read there; the text is written
    // after it is released.
    let workers = {
        let mut core = app.core();
        core.export_worker_counters();
        core.refresh_metrics(now_ms());
        let live = core.cancels().live_count();
        app.metrics.cancels_live.set(live as i64);
        super::rate_limits::refresh_metrics(&app, &core.rate_limits_view(now_ms()));
        core.worker_series()
    };
    let text = app.metrics.encode_with(workers);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

pub async fn workers(State(app): AppState) -> Json<Value> {
    let list = app.core().workers_view(now_ms());
    Json(json!({ "workers": list }))
}

pub async fn worker(
    State(app): AppState,
    Path(id): Path<String>,
) -> Result<Json<WorkerView>, ApiError> {
    let id = AgentId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    app.core()
        .worker_view(id.as_str(), now_ms())
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no worker '{id}'")))
}

/// `GET /api/errors`: failures grouped by stage and error class (sample
/// messages withheld from a reader without the token).
pub async fn errors(State(app): AppState, scope: ReadScope) -> Result<Json<Value>, ApiError> {
    let view = app.core().errors_view(now_ms());
    let mut body = to_json(&view)?;
    if !scope.full {
        redact::errors(&mut body);
    }
    Ok(Json(body))
}

fn to_json<T: serde::Serialize>(view: &T) -> Result<Value, ApiError> {
    serde_json::to_value(view)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

pub async fn stages(State(app): AppState) -> Json<Value> {
    let view = app.core().stages_view(now_ms());
    Json(serde_json::to_value(view).unwrap_or_else(|e| json!({ "error": e.to_string() })))
}

pub async fn scaling(State(app): AppState) -> Json<Value> {
    let view = app.core().scaling_view(now_ms());
    let mut body = serde_json::to_value(view).unwrap_or_else(|e| json!({ "error": e.to_string() }));
    body["dry_run"] = json!(app.dry_run);
    body["manual"] = json!(app.manual_scales.list());
    Json(body)
}

/// `GET /api/tasks/{id}` (attempt errors withheld from a reader without the token).
pub async fn task(
    State(app): AppState,
    scope: ReadScope,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = TaskId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let view: TaskView = app.core().task_view(id.as_str(), now_ms()).ok_or_else(|| {
        ApiError::not_found(format!(
            "no task '{id}' (unknown, or finished and past the retention limits)"
        ))
    })?;
    let mut body = to_json(&view)?;
    // Flows (issue 19): a release its stage cannot take now, and why.
    if body["flow"].is_object()
        && let Some(release) = super::held::release_view(&app, &id)
    {
        body["flow"]["release"] = release;
    }
    if !scope.full {
        redact::task(&mut body);
    }
    Ok(Json(body))
}

pub async fn tasks(
    State(app): AppState,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut filter = TaskFilter {
        limit: DEFAULT_LIMIT,
        ..TaskFilter::default()
    };
    for (key, value) in &query {
        match key.as_str() {
            "status" if value.is_empty() => {}
            "status" => {
                filter.status = Some(TaskStatus::parse(value).ok_or_else(|| {
                    let valid: Vec<_> = TaskStatus::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::bad_request(format!(
                        "unknown status '{value}' (one of: {})",
                        valid.join(", ")
                    ))
                })?);
            }
            "stage" if value.is_empty() => {}
            "stage" => {
                let stage =
                    Stage::new(value.as_str()).map_err(|e| ApiError::bad_request(e.to_string()))?;
                if !app.core().knows_stage(stage.as_str()) {
                    return Err(ApiError::not_found(format!("unknown stage '{stage}'")));
                }
                filter.stage = Some(stage);
            }
            "limit" => filter.limit = parse_limit(value)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter '{other}' (expected status, stage, limit)"
                )));
            }
        }
    }
    let list = app.core().tasks_view(&filter, now_ms());
    Ok(Json(json!({ "tasks": list })))
}

/// Body of `POST /api/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    /// The stage to queue the task on.
    stage: String,
    /// The task's id; a UUIDv7 if absent.
    id: Option<String>,
    /// The payload: a string is sent as its UTF-8 bytes, any other JSON
    /// value as its JSON text.
    payload: Option<Value>,
    /// The payload as base64, for binary data.
    payload_base64: Option<String>,
    /// Priority 0-9, higher first (default 0).
    priority: Option<Value>,
    /// Delay before it can start, in ms.
    delay_ms: Option<Value>,
    /// Delay before it can start, as a duration (`90s`).
    delay: Option<String>,
    /// When it can start, RFC 3339 (`2026-12-07T09:00:00Z`).
    at: Option<String>,
    /// Flows (issue 19): hold it until these tasks have finished.
    after: Option<Value>,
    /// With `after`: `fail` (default) or `run` when one of them fails.
    on_dependency_failure: Option<Value>,
}

/// The priority and due time of a `POST /api/tasks` body.
fn submit_when(req: &SubmitBody, now: u64) -> Result<crate::submit::When, ApiError> {
    use crate::submit::{When, check_delay_ms, parse_at, parse_delay};
    let priority = match &req.priority {
        None | Some(Value::Null) => guildhall_proto::Priority::DEFAULT,
        Some(v) => super::body::priority(v).ok_or_else(|| {
            ApiError::bad_request(format!(
                "priority must be a whole number from 0 to 9, higher first (got {})",
                shown(v)
            ))
        })?,
    };
    let delays = [
        req.delay_ms.is_some(),
        req.delay.is_some(),
        req.at.is_some(),
    ];
    if delays.iter().filter(|d| **d).count() > 1 {
        return Err(ApiError::bad_request(
            "give one of delay_ms, delay and at, not several",
        ));
    }
    let due_at_ms = if let Some(v) = &req.delay_ms {
        let ms = v.as_u64().ok_or_else(|| {
            ApiError::bad_request(format!(
                "delay_ms must be a whole number of milliseconds, 0 or more (got {})",
                shown(v)
            ))
        })?;
        Some(now.saturating_add(check_delay_ms(ms).map_err(ApiError::bad_request)?))
    } else if let Some(d) = &req.delay {
        Some(now.saturating_add(parse_delay(d).map_err(ApiError::bad_request)?))
    } else if let Some(at) = &req.at {
        Some(parse_at(at, now).map_err(ApiError::bad_request)?)
    } else {
        None
    };
    Ok(When {
        priority,
        due_at_ms,
    })
}

/// A JSON value in an error message, cut short.
fn shown(v: &Value) -> String {
    let text = v.to_string();
    text.chars().take(40).collect()
}

pub async fn submit(
    State(app): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: SubmitBody = super::body::parse(body)?;
    let hold = super::held::hold_of(req.after.as_ref(), req.on_dependency_failure.as_ref())?;
    if hold.is_some() && (req.delay_ms.is_some() || req.delay.is_some() || req.at.is_some()) {
        return Err(ApiError::bad_request(
            "after and delay together are not supported (delay_ms, delay and at): a held task is published when its dependencies have finished",
        ));
    }
    let when = submit_when(&req, now_ms())?;
    let stage = Stage::new(req.stage).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let id = req
        .id
        .map(TaskId::new)
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let payload = match (req.payload, req.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give payload or payload_base64, not both",
            ));
        }
        (Some(Value::String(s)), None) => s.into_bytes(),
        (Some(v), None) => {
            serde_json::to_vec(&v).map_err(|e| ApiError::bad_request(e.to_string()))?
        }
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| {
                ApiError::bad_request(format!("payload_base64 is not valid base64: {e}"))
            })?,
        (None, None) => Vec::new(),
    };
    if let Some(hold) = hold {
        return super::held::submit(&app, stage, id, payload, when.priority, hold).await;
    }
    let timeout = app.http.config.broker_timeout;
    let publish = async {
        let (conn, publisher) = app
            .link
            .get()
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        app.submitter
            .submit_when(Some(&conn), &publisher, stage, id, &payload, when)
            .await
            .map_err(|e| match e {
                SubmitError::UnknownStage { .. } => ApiError::not_found(e.to_string()),
                SubmitError::TooLarge(_) => {
                    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
                }
                SubmitError::Broker(_) => ApiError::unavailable(e.to_string()),
            })
    };
    let submitted = tokio::time::timeout(timeout, publish).await.map_err(|_| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the broker did not confirm the task within {} (--broker-timeout): it may or may not be queued; look for it with GET /api/tasks/{{id}} before sending it again",
                humantime::format_duration(timeout)
            ),
        )
    })??;
    let body = json!({
        "id": submitted.id.as_str(),
        "stage": submitted.stage.as_str(),
        "status": if when.due_at_ms.is_some_and(|d| d > now_ms() + 500) { "scheduled" } else { "queued" },
        "priority": when.priority.get(),
        "due_at_ms": when.due_at_ms,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(super) fn parse_limit(value: &str) -> Result<usize, ApiError> {
    value
        .parse::<usize>()
        .ok()
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "limit must be a number from 1 to {MAX_LIMIT} (got '{value}')"
            ))
        })
}
