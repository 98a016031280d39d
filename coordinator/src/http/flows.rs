//! `GET /api/flows/{id}` (issue 19): the flow a task belongs to, as a graph
//! from its root (`Core::flow_view`): nodes with their status, stage,
//! parent and ETA; `child` (fan-out) and `after` (dependency) edges; every
//! task of the flow counted by status; whether nodes were left out.
//!
//! A read route: open unless `--protect-reads`, like `GET /api/tasks/{id}`.
//! Nothing in the view is worker-written (ids and stage names are validated
//! names, statuses and numbers are the coordinator's), so nothing is
//! withheld from a reader without the token; a task's `failed_because`,
//! which can quote a worker's error, is in `GET /api/tasks/{id}`'s `flow`
//! and withheld there (`redact::task`).

use super::error::ApiError;
use crate::core::flows::views::FlowView;
use crate::serve::App;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use guildhall_broker::now_ms;
use guildhall_proto::TaskId;
use serde_json::Value;
use std::sync::Arc;

/// `GET /api/flows/{id}`: 400 for an invalid id, 404 for a task the
/// coordinator does not know (or has forgotten).
pub async fn flow(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = TaskId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // The view is built under the lock, serialized after it.
    let view: FlowView = app.core().flow_view(&id, now_ms()).ok_or_else(|| {
        ApiError::not_found(format!(
            "no task '{id}' (unknown, or finished and past the retention limits)"
        ))
    })?;
    serde_json::to_value(&view)
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}
