//! `GET /api/results/{id}[?sha256=HEX]` (issue 19): a fan-out child's
//! result, as the bytes its worker returned.
//!
//! A result over `flow::MAX_INLINE_RESULT` is stored by its agent in
//! `<ns>.results`; the join's payload refers to it with this route's URL,
//! digest included. The digest says which message is the result (the
//! reported one, never a forged message under the same id): it comes from
//! the query, else from the parent's join while the coordinator remembers
//! it. The message is found through [`crate::serve::results`] and read at
//! its offset, and its bytes are checked against the digest before they
//! are sent. A small result is answered from the join while it still holds
//! it (until the join is released).
//!
//! Answers: 200 with the bytes (`application/octet-stream`,
//! `x-guildhall-result-sha256`); 400 for an invalid id, an unknown query
//! parameter or a digest that is not 64 hex digits; 403 without the token
//! when one is configured (a result is worker-written); 404 when nothing
//! is known or stored under that id and digest; 410 when the stream's
//! retention has dropped it; 503 while the index is still reading the
//! stream after a start (after waiting up to 5 s for it), or the broker is
//! unreachable; 504 past
//! `--broker-timeout`. Reads share the dead-letter routes' connection and
//! their bound on concurrent broker calls.

use super::dead_letters::on_broker;
use super::error::ApiError;
use super::redact::ReadScope;
use crate::dead::DeadError;
use crate::serve::App;
use crate::serve::results::{Lookup, Read, read_at};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use guildhall_proto::TaskId;
use guildhall_proto::flow;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a read waits for the index to reach a result it has not read
/// yet (after a start) before answering 503.
const INDEX_WAIT: Duration = Duration::from_secs(5);

/// The header naming the digest of the bytes answered.
pub const SHA256_HEADER: &str = "x-guildhall-result-sha256";

/// `GET /api/results/{id}`.
pub async fn result(
    State(app): State<Arc<App>>,
    scope: ReadScope,
    Path(id): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = TaskId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut asked: Option<[u8; 32]> = None;
    for (key, value) in &query {
        match key.as_str() {
            "sha256" => asked = Some(parse_digest(value)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter '{other}' (expected sha256)"
                )));
            }
        }
    }
    if !scope.full {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "a task's result is worker-written: present the API token (Authorization: Bearer, or access_token=)",
        ));
    }
    let known = app.core().child_result(&id);
    let digest = match (asked, known.as_ref().and_then(|k| k.sha256)) {
        (Some(a), Some(k)) if a != k => {
            return Err(ApiError::not_found(format!(
                "task {id}'s stored result has another SHA-256"
            )));
        }
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => {
            return match known.and_then(|k| k.inline) {
                Some(bytes) => Ok(answer(bytes.to_vec(), &Sha256::digest(&bytes).into())),
                None => Err(ApiError::not_found(format!(
                    "no result known for task {id}: it is not a fan-out child that succeeded, its result went to its join already, or its join is forgotten; a join's result_ref carries the URL with its sha256"
                ))),
            };
        }
    };
    let stream = app.names.results_stream();
    let timeout = app.http.config.broker_timeout;
    let deadline = Instant::now() + timeout;
    // Just after a start the index may not have reached the result yet:
    // wait for it a little (a join's worker asks as soon as it is given the
    // reference).
    let wait_until = Instant::now() + INDEX_WAIT.min(timeout);
    let mut lookup = app.results.find(&id, &digest);
    while lookup == Lookup::NotYet && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        lookup = app.results.find(&id, &digest);
    }
    let stored = match lookup {
        Lookup::Found(s) => s,
        Lookup::NotYet => {
            return Err(ApiError::unavailable(format!(
                "the coordinator is still reading {stream} since it started: retry in a moment"
            )));
        }
        Lookup::Missing => {
            return Err(ApiError::not_found(format!(
                "no result of task {id} with that SHA-256 in {stream} (never stored, or dropped by the stream's retention)"
            )));
        }
    };
    let reader = app.clone();
    let read = tokio::spawn(async move {
        on_broker(&reader, deadline, |conn, _| async move {
            read_at(&conn, &stream, stored.offset, deadline)
                .await
                .map_err(DeadError::from)
        })
        .await
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let stream = app.names.results_stream();
    match read {
        Ok(Read::Message { message_id, body })
            if message_id.as_deref() == Some(id.as_str())
                && <[u8; 32]>::from(Sha256::digest(&body)) == digest =>
        {
            Ok(answer(body, &digest))
        }
        Ok(Read::Message { .. }) => {
            // The index was built from this very offset: the stream was
            // deleted and declared again since.
            tracing::warn!(task = %id, offset = stored.offset, "{stream} holds another message at a stored result's offset");
            Err(ApiError::not_found(format!(
                "task {id}'s stored result is no longer in {stream} (the stream was replaced)"
            )))
        }
        Ok(Read::Gone) => Err(ApiError::new(
            StatusCode::GONE,
            format!("task {id}'s stored result was dropped by {stream}'s retention"),
        )),
        Ok(Read::TimedOut) | Err(DeadError::TimedOut) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "reading task {id}'s result from {stream} did not finish within {} (--broker-timeout)",
                humantime::format_duration(timeout)
            ),
        )),
        Err(e) => Err(ApiError::unavailable(format!(
            "reading task {id}'s result from {stream}: {e}"
        ))),
    }
}

/// 64 hex digits (either case).
fn parse_digest(value: &str) -> Result<[u8; 32], ApiError> {
    flow::parse_digest_hex(value)
        .ok_or_else(|| ApiError::bad_request("sha256 must be 64 hex digits"))
}

fn answer(body: Vec<u8>, digest: &[u8; 32]) -> Response {
    let hex = flow::digest_hex(digest);
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::HeaderName::from_static(SHA256_HEADER), hex),
        ],
        Body::from(body),
    )
        .into_response()
}
