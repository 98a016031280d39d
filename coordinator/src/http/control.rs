//! Control endpoints: commands to one worker's agent (pause, resume, drain,
//! restart its worker process, concurrency, logs) and to every live worker
//! of a stage, sent on the control exchange and confirmed by the agent.
//!
//! Answers: 200 with the agent's confirmation; 400 for a bad id or body; 404
//! for an unknown worker or stage; 409 when the worker is dead or stopped,
//! not connected, or the agent refused (the reason is the agent's); 504 when
//! the agent did not confirm within `--command-timeout`; 503 when the broker
//! is unreachable.

use super::error::ApiError;
use crate::serve::App;
use crate::serve::control::ControlError;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use guildhall_broker::now_ms;
use guildhall_proto::{AgentId, Command, CommandReply, Stage};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

type AppState = State<Arc<App>>;

/// Largest concurrency an agent accepts.
pub const MAX_CONCURRENCY: u32 = 1024;
/// Log lines returned when `lines` is not given, and the most asked for.
const DEFAULT_LOG_LINES: u32 = 100;
const MAX_LOG_LINES: u32 = 10_000;

/// Checks that `id` names a worker that can take a command.
fn live_worker(app: &App, id: String) -> Result<AgentId, ApiError> {
    let id = AgentId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let view = app
        .core()
        .worker_view(id.as_str(), now_ms())
        .ok_or_else(|| ApiError::not_found(format!("no worker '{id}'")))?;
    match view.status {
        "dead" => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "worker '{id}' is dead (silent for {} s): it cannot take commands",
                view.last_seen_ago_ms / 1000
            ),
        )),
        "stopped" => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "worker '{id}' has stopped ({}): it cannot take commands",
                view.stopped_reason.as_deref().unwrap_or("no reason given")
            ),
        )),
        _ => Ok(id),
    }
}

/// Sends `command` and maps the outcome to an answer.
async fn send(app: &App, id: &AgentId, command: Command) -> Result<CommandReply, ApiError> {
    let kind = command.kind();
    match app.control.send(id, command, app.command_timeout).await {
        Ok(reply) if reply.ok => {
            tracing::info!(worker = %id, kind, "control: {}", reply.message);
            Ok(reply)
        }
        Ok(reply) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("worker '{id}' refused {kind}: {}", reply.message),
        )),
        Err(e @ ControlError::NotConnected(_)) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.to_string()))
        }
        Err(e @ ControlError::Timeout { .. }) => {
            Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()))
        }
        Err(e @ ControlError::Broker(_)) => Err(ApiError::unavailable(e.to_string())),
    }
}

async fn command_worker(app: &App, id: String, command: Command) -> Result<Json<Value>, ApiError> {
    let id = live_worker(app, id)?;
    let kind = command.kind();
    let reply = send(app, &id, command).await?;
    Ok(Json(json!({
        "ok": true,
        "worker": id.as_str(),
        "command": kind,
        "message": reply.message,
    })))
}

/// `POST /api/workers/{id}/pause`: stop consuming, finish the tasks in hand.
pub async fn pause(State(app): AppState, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    command_worker(&app, id, Command::Pause).await
}

/// `POST /api/workers/{id}/resume`.
pub async fn resume(State(app): AppState, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    command_worker(&app, id, Command::Resume).await
}

/// `POST /api/workers/{id}/drain`: finish the tasks in hand, then exit.
pub async fn drain(State(app): AppState, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    command_worker(&app, id, Command::Drain).await
}

/// `POST /api/workers/{id}/restart`: restart the supervised worker process.
pub async fn restart(
    State(app): AppState,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    command_worker(&app, id, Command::RestartWorker).await
}

/// `POST /api/workers/{id}/concurrency` with `{"concurrency": N}`.
pub async fn concurrency(
    State(app): AppState,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let value: Value = super::body::parse(body)?;
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object like {\"concurrency\": 4}",
        ));
    };
    if let Some(key) = object.keys().find(|k| k.as_str() != "concurrency") {
        return Err(ApiError::bad_request(format!(
            "unknown field '{key}' (expected: concurrency)"
        )));
    }
    let n = object
        .get("concurrency")
        .ok_or_else(|| ApiError::bad_request("missing field 'concurrency'"))?;
    let concurrency = n
        .as_u64()
        .filter(|n| (1..=u64::from(MAX_CONCURRENCY)).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "concurrency must be a whole number from 1 to {MAX_CONCURRENCY} (got {n})"
            ))
        })? as u32;
    command_worker(&app, id, Command::SetConcurrency { concurrency }).await
}

/// `GET /api/workers/{id}/logs?lines=N`: the last lines of the supervised
/// worker process's output, fetched from its agent.
pub async fn logs(
    State(app): AppState,
    Path(id): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut lines = DEFAULT_LOG_LINES;
    for (key, value) in &query {
        match key.as_str() {
            "lines" => {
                lines = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LOG_LINES).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "lines must be a number from 1 to {MAX_LOG_LINES} (got '{value}')"
                        ))
                    })?;
            }
            "access_token" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter '{other}' (expected: lines)"
                )));
            }
        }
    }
    let id = live_worker(&app, id)?;
    let reply = send(&app, &id, Command::Logs { lines }).await?;
    Ok(Json(json!({
        "worker": id.as_str(),
        "lines": reply.lines,
    })))
}

/// `POST /api/stages/{stage}/pause|resume|drain`: the command to every live
/// worker of the stage, at once; one result per worker.
pub async fn stage_command(
    State(app): AppState,
    Path((stage, action)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let stage = Stage::new(stage).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let command = match action.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "drain" => Command::Drain,
        other => {
            return Err(ApiError::not_found(format!(
                "no stage action '{other}' (one of: pause, resume, drain)"
            )));
        }
    };
    let workers: Vec<AgentId> = {
        let core = app.core();
        let now = now_ms();
        if !core.stage_names().any(|s| s == &stage) {
            return Err(ApiError::not_found(format!("unknown stage '{stage}'")));
        }
        core.workers_view(now)
            .into_iter()
            .filter(|w| w.stage == stage.as_str() && !matches!(w.status, "dead" | "stopped"))
            .filter_map(|w| AgentId::new(w.id).ok())
            .collect()
    };
    if workers.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("stage '{stage}' has no live worker"),
        ));
    }
    let mut set = tokio::task::JoinSet::new();
    for id in workers {
        let (app, command) = (app.clone(), command.clone());
        set.spawn(async move {
            let outcome = send(&app, &id, command).await;
            (id, outcome)
        });
    }
    let mut results = Vec::new();
    while let Some(done) = set.join_next().await {
        if let Ok((id, outcome)) = done {
            results.push(match outcome {
                Ok(reply) => json!({"worker": id.as_str(), "ok": true, "message": reply.message}),
                Err(e) => json!({"worker": id.as_str(), "ok": false, "message": e.message}),
            });
        }
    }
    results.sort_by(|a, b| a["worker"].as_str().cmp(&b["worker"].as_str()));
    Ok(Json(
        json!({ "stage": stage.as_str(), "command": action, "results": results }),
    ))
}
