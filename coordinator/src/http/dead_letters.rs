//! `GET /api/dead/{stage}` and `POST /api/dead/{stage}/replay`.
//!
//! Every call shares one broker connection ([`DeadLetters::link`], its own,
//! so a broker error there cannot disturb submissions or the events
//! consumer), at most [`DEAD_LETTER_WORK`] run at once, and each must be
//! done within `--broker-timeout`, waiting for its turn included: past it the
//! answer is 504 with a JSON message. The work runs in a task of its own, so
//! a client that hangs up mid-call cannot leave a channel holding messages:
//! the task still finishes (by the deadline) and closes it.

use super::api::{DEFAULT_LIMIT, parse_limit};
use super::error::ApiError;
use super::redact::{self, ReadScope};
use crate::dead::{self, DeadError};
use crate::serve::App;
use crate::serve::link::BrokerLink;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use guildhall_broker::Publisher;
use guildhall_proto::{Event, Stage, TaskId, TaskSubmitted};
use lapin::Connection;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Dead-letter calls running at once; the others wait their turn (within
/// their deadline). Each holds at most one message (up to a task's 16 MiB).
pub const DEAD_LETTER_WORK: usize = 2;

/// The shared connection and the bound on concurrent calls.
pub struct DeadLetters {
    /// The connection every call shares, opened on first use and again
    /// after it failed or was abandoned.
    pub link: BrokerLink,
    /// Places for calls running at once.
    work: Arc<Semaphore>,
}

impl DeadLetters {
    /// Calls on `link`, [`DEAD_LETTER_WORK`] at a time.
    pub fn new(link: BrokerLink) -> Self {
        Self {
            link,
            work: Arc::new(Semaphore::new(DEAD_LETTER_WORK)),
        }
    }
}

/// The 504 of a call past `--broker-timeout`.
fn timed_out(what: &str, timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "{what} did not finish within {} (--broker-timeout): the broker is slow or stuck; nothing was taken from the dead-letter queue",
            humantime::format_duration(timeout)
        ),
    )
}

fn dead_error(e: DeadError, what: &str, timeout: Duration) -> ApiError {
    match e {
        DeadError::UnknownStage(..) => ApiError::not_found(e.to_string()),
        DeadError::TimedOut => timed_out(what, timeout),
        _ => ApiError::unavailable(e.to_string()),
    }
}

/// Runs `call` on the shared connection in a task of its own, in turn and
/// within `--broker-timeout`.
async fn run<T, F, Fut>(app: &Arc<App>, what: &str, call: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(Arc<Connection>, Publisher, Instant) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, DeadError>> + Send,
{
    let timeout = app.http.config.broker_timeout;
    let deadline = Instant::now() + timeout;
    let task = tokio::spawn({
        let app = app.clone();
        async move {
            let dead = &app.http.dead_letters;
            let _turn = tokio::time::timeout_at(deadline, dead.work.clone().acquire_owned())
                .await
                .map_err(|_| DeadError::TimedOut)?
                .map_err(|_| DeadError::TimedOut)?;
            let (conn, publisher) = match tokio::time::timeout_at(deadline, dead.link.get()).await {
                Ok(linked) => linked?,
                Err(_) => {
                    // A connect that hangs holds the link: start afresh next time.
                    dead.link.close().await;
                    return Err(DeadError::TimedOut);
                }
            };
            call(conn, publisher, deadline).await
        }
    });
    match task.await {
        Ok(result) => result.map_err(|e| dead_error(e, what, timeout)),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what} failed: {e}"),
        )),
    }
}

/// `GET /api/dead/{stage}?limit=N`: dead-lettered tasks, left in place.
pub async fn list(
    State(app): State<Arc<App>>,
    scope: ReadScope,
    Path(stage): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let stage = Stage::new(stage).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut limit = DEFAULT_LIMIT;
    for (key, value) in &query {
        match key.as_str() {
            "limit" => limit = parse_limit(value)?,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter '{other}' (expected limit)"
                )));
            }
        }
    }
    let names = app.names.clone();
    let listing =
        run(
            &app,
            "listing the dead letters",
            move |conn, _, deadline| async move {
                dead::list(&conn, &names, &stage, limit, deadline).await
            },
        )
        .await?;
    let mut body = serde_json::to_value(listing)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !scope.full {
        redact::dead_letters(&mut body);
    }
    Ok(Json(body))
}

/// Body of `POST /api/dead/{stage}/replay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    /// Replay these tasks.
    ids: Option<Vec<String>>,
    /// Replay every dead letter of the stage.
    #[serde(default)]
    all: bool,
}

/// `POST /api/dead/{stage}/replay`: `{"ids": [...]}` or `{"all": true}`.
pub async fn replay(
    State(app): State<Arc<App>>,
    Path(stage): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<dead::Replayed>, ApiError> {
    let stage = Stage::new(stage).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let req: ReplayBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let selection = match (req.ids, req.all) {
        (Some(_), true) => {
            return Err(ApiError::bad_request("give ids or all, not both"));
        }
        (Some(ids), false) => {
            if ids.is_empty() {
                return Err(ApiError::bad_request("ids is empty"));
            }
            for id in &ids {
                TaskId::new(id.as_str()).map_err(|e| ApiError::bad_request(e.to_string()))?;
            }
            dead::Selection::Ids(ids.into_iter().collect())
        }
        (None, true) => dead::Selection::All,
        (None, false) => {
            return Err(ApiError::bad_request(
                "say what to replay: {\"ids\": [...]} or {\"all\": true}",
            ));
        }
    };
    let names = app.names.clone();
    let replay_stage = stage.clone();
    let replayed = run(
        &app,
        "the replay",
        move |conn, publisher, deadline| async move {
            dead::replay(
                &conn,
                &publisher,
                &names,
                &replay_stage,
                &selection,
                deadline,
            )
            .await
        },
    )
    .await?;
    // Tell the coordinator (and any other reader) the tasks are queued
    // again, stamped with when they were (see `Submitter::submit`).
    if !replayed.replayed.is_empty() {
        announce(&app, &stage, &replayed).await;
    }
    if replayed.timed_out {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the replay did not finish within {} (--broker-timeout): {} task(s) were sent back to {stage} ({}); the others are still dead letters: replay again",
                humantime::format_duration(app.http.config.broker_timeout),
                replayed.replayed.len(),
                replayed
                    .replayed
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(Json(replayed))
}

/// Publishes `TaskSubmitted` for each replayed task, within `--broker-timeout`
/// (the events are information: the tasks are queued whatever happens here).
async fn announce(app: &App, stage: &Stage, replayed: &dead::Replayed) {
    let events = replayed
        .replayed
        .iter()
        .zip(&replayed.enqueued_at_ms)
        .filter_map(|(id, at)| Some((TaskId::new(id.as_str()).ok()?, *at)))
        .map(|(task_id, at_ms)| {
            Event::TaskSubmitted(TaskSubmitted {
                at_ms,
                task_id,
                stage: stage.clone(),
                payload_bytes: 0,
            })
        })
        .collect();
    let publish = async {
        if let Ok((_, publisher)) = app.link.get().await {
            app.submitter.publish_events(&publisher, events).await;
        }
    };
    if tokio::time::timeout(app.http.config.broker_timeout, publish)
        .await
        .is_err()
    {
        tracing::warn!(%stage, "replayed tasks not announced on the events stream: the broker did not confirm in time");
    }
}
