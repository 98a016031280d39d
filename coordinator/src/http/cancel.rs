//! Cancel endpoints (issue 18), control routes behind the token:
//!
//! - `DELETE /api/tasks/{id}[?by=NAME]`: 202 `{"task_id", "result":
//!   "requested" | "already_requested", "status", "with_children",
//!   "cancelled"}`; 404 for an unknown id,
//!   409 `{"error", "result": "already_finished"}` for a finished task, 400
//!   for a malformed id or name, 429 past the bound on live cancels, 503
//!   when the request cannot be recorded, 504 when the broker does not
//!   confirm it within `--broker-timeout`.
//! - `POST /api/tasks/cancel` with `{"ids": [...]}` or a filter `{"stage",
//!   "status", "priority", "prefix"}` (at least one), `"dry_run": true` for
//!   the count and a sample of ids without cancelling, `"by"` for the name
//!   in the trace. At most [`MAX_BULK`] tasks at once (besides their
//!   children); `cancelled` counts the children too.
//!
//! Flows (issue 19): a cancel stops a whole flow. The ids asked for are
//! expanded with their open children (and theirs: the core's
//! `with_flow_descendants`, at most [`MAX_CHILDREN`] more per call) before
//! anything is decided; the answers say how many of those were cancelled
//! too (`with_children`) and in all (`cancelled`). A held task cancelled is
//! settled by the core at once (it is in no queue).
//!
//! What to do is the core's ([`Core::cancel`]); recording and telling the
//! agents is [`crate::serve::cancel`]'s, the broker time-out this module's.
//!
//! [`Core::cancel`]: guildhall_core::core::Core::cancel

use super::error::ApiError;
use crate::serve::App;
use crate::serve::cancel;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use guildhall_broker::now_ms;
use guildhall_core::core::scheduling::cancels::{CancelFilter, CancelOutcome};
use guildhall_core::core::tasks::TaskStatus;
use guildhall_proto::{Stage, TaskId};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

type AppState = State<Arc<App>>;

/// Most tasks one bulk cancel takes (the rest stay: run it again).
pub const MAX_BULK: usize = 10_000;

/// Most open children (of fanned-out tasks, at any depth) one call
/// cancels besides the tasks it names.
pub const MAX_CHILDREN: usize = 10_000;

/// Ids shown in a bulk answer.
const SAMPLE: usize = 20;

/// Who asks when the caller does not say.
const DEFAULT_BY: &str = "api";

/// Checks a requester's name: 1-64 characters of A-Z a-z 0-9 _ - . : @.
pub fn valid_by(by: &str) -> Result<(), String> {
    let ok = !by.is_empty()
        && by.len() <= 64
        && by
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {by:?} for 'by': 1-64 characters of A-Z a-z 0-9 _ - . : @"
        ))
    }
}

/// What one cancel call did.
struct Cancelled {
    /// Each id asked for, with its outcome.
    asked: Vec<(TaskId, CancelOutcome)>,
    /// Their open children (issue 19), with theirs.
    children: Vec<(TaskId, CancelOutcome)>,
}

impl Cancelled {
    /// Children whose cancel was requested (or already was).
    fn with_children(&self) -> usize {
        self.children.iter().filter(|(_, o)| o.broadcast()).count()
    }
}

/// Cancels `ids` and their open children for `by`: decides, records
/// (confirmed within the broker time-out: 503, 504), tells the agents.
async fn request(app: &App, ids: Vec<TaskId>, by: &str) -> Result<Cancelled, ApiError> {
    let asked = ids.len();
    let ids = app
        .core()
        .with_flow_descendants(&ids, asked.saturating_add(MAX_CHILDREN));
    let (mut results, events) = cancel::decide(app, ids, by);
    super::write::confirmed(
        app,
        cancel::record(app, events),
        "cannot record the cancel on the events stream",
        "the broker did not confirm the cancel in time: it may or may not be recorded; look with GET /api/tasks/{id}",
    )
    .await?;
    cancel::tell(app, &results, by).await;
    let children = results.split_off(asked.min(results.len()));
    Ok(Cancelled {
        asked: results,
        children,
    })
}

/// `DELETE /api/tasks/{id}`.
pub async fn cancel_one(
    State(app): AppState,
    Path(id): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some(key) = query.keys().find(|k| k.as_str() != "by") {
        return Err(ApiError::bad_request(format!(
            "unknown parameter '{key}' (expected: by)"
        )));
    }
    let by = query.get("by").map_or(DEFAULT_BY, String::as_str);
    valid_by(by).map_err(ApiError::bad_request)?;
    let id = TaskId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut done = request(&app, vec![id.clone()], by).await?;
    let children = done.with_children();
    let outcome = done.asked.pop().map_or(CancelOutcome::Unknown, |(_, o)| o);
    match outcome {
        CancelOutcome::Requested { status } => Ok((
            StatusCode::ACCEPTED,
            Json(json!({
                "task_id": id.as_str(),
                "result": outcome.as_str(),
                "status": status.as_str(),
                "by": by,
                "with_children": children,
                "cancelled": 1 + children,
            })),
        )
            .into_response()),
        CancelOutcome::AlreadyRequested => Ok((
            StatusCode::ACCEPTED,
            Json(json!({
                "task_id": id.as_str(),
                "result": outcome.as_str(),
                "by": by,
                "with_children": children,
                "cancelled": 1 + children,
            })),
        )
            .into_response()),
        CancelOutcome::AlreadyFinished { status } => Ok((
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("task '{id}' already finished ({})", status.as_str()),
                "task_id": id.as_str(),
                "result": outcome.as_str(),
                "status": status.as_str(),
            })),
        )
            .into_response()),
        CancelOutcome::Unknown => Err(ApiError::not_found(format!(
            "no task '{id}' (unknown, or finished and past the retention limits)"
        ))),
        CancelOutcome::TooMany => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many cancels are waiting to settle; try again later",
        )),
    }
}

/// The body of `POST /api/tasks/cancel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    /// Explicit ids (instead of a filter).
    ids: Option<Vec<String>>,
    /// Filter: current stage.
    stage: Option<String>,
    /// Filter: status (`queued`, `running`, `retrying`).
    status: Option<String>,
    /// Filter: priority 0-9.
    priority: Option<Value>,
    /// Filter: the start of the id.
    prefix: Option<String>,
    /// Only count and sample.
    #[serde(default)]
    dry_run: bool,
    /// Who asks.
    by: Option<String>,
}

/// Parses the filter part of a bulk body.
fn filter_of(b: &BulkBody) -> Result<CancelFilter, ApiError> {
    let stage = b
        .stage
        .as_deref()
        .map(Stage::new)
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let status = match b.status.as_deref() {
        None => None,
        Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown status {s:?} (expected one of: {})",
                TaskStatus::ALL.map(|s| s.as_str()).join(", ")
            ))
        })?),
    };
    let priority = match &b.priority {
        None => None,
        Some(v) => Some(super::body::priority(v).ok_or_else(|| {
            ApiError::bad_request(format!("invalid priority {v}: a whole number from 0 to 9"))
        })?),
    };
    if let Some(p) = &b.prefix
        && (p.is_empty() || p.len() > 128)
    {
        return Err(ApiError::bad_request(
            "prefix must be 1-128 characters of a task id",
        ));
    }
    Ok(CancelFilter {
        stage,
        status,
        priority,
        id_prefix: b.prefix.clone(),
    })
}

/// `POST /api/tasks/cancel`.
pub async fn cancel_bulk(
    State(app): AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: BulkBody = super::body::parse(body)?;
    let by = b.by.clone().unwrap_or_else(|| DEFAULT_BY.to_owned());
    valid_by(&by).map_err(ApiError::bad_request)?;
    let filter = filter_of(&b)?;
    let has_filter = filter != CancelFilter::default();
    let (count, ids) = match &b.ids {
        Some(_) if has_filter => {
            return Err(ApiError::bad_request(
                "give ids or a filter (stage, status, priority, prefix), not both",
            ));
        }
        Some(ids) => {
            if ids.is_empty() || ids.len() > MAX_BULK {
                return Err(ApiError::bad_request(format!(
                    "ids must list 1 to {MAX_BULK} task ids"
                )));
            }
            let ids = ids
                .iter()
                .map(|i| TaskId::new(i.as_str()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            (ids.len(), ids)
        }
        None if !has_filter => {
            return Err(ApiError::bad_request(
                "give ids or at least one of stage, status, priority, prefix",
            ));
        }
        None => {
            let m = app.core().cancel_matching(&filter, MAX_BULK, now_ms());
            (m.count, m.ids)
        }
    };
    if b.dry_run {
        let sample: Vec<&str> = ids.iter().take(SAMPLE).map(|i| i.as_str()).collect();
        return Ok(Json(json!({
            "dry_run": true,
            "count": count,
            "sample": sample,
        }))
        .into_response());
    }
    let done = request(&app, ids, &by).await?;
    let with_children = done.with_children();
    let mut tally: HashMap<&'static str, usize> = HashMap::new();
    for (_, o) in done.asked.iter().chain(&done.children) {
        *tally.entry(o.as_str()).or_default() += 1;
    }
    let sample: Vec<Value> = done
        .asked
        .iter()
        .take(SAMPLE)
        .map(|(id, o)| json!({"task_id": id.as_str(), "result": o.as_str()}))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "dry_run": false,
            "count": count,
            "cancelled": tally.get("requested").copied().unwrap_or(0)
                + tally.get("already_requested").copied().unwrap_or(0),
            "results": tally,
            "with_children": with_children,
            "sample": sample,
            "by": by,
        })),
    )
        .into_response())
}
