//! The HTTP side: the dashboard, JSON API, Server-Sent Events, `/metrics`
//! and `/healthz` (axum on hyper).
//!
//! # Layout
//!
//! - `api`: read endpoints, submitting, dead letters;
//! - `control`: commands to workers and stages;
//! - `events`: `GET /api/events` (SSE);
//! - `access`: the bearer token (`--api-token`, `--protect-reads`);
//! - `dashboard`: the page, its CSS and JS, embedded in the binary;
//! - `error`: the JSON error type.
//!
//! Handlers lock the core only to build a view, then serialize outside the
//! lock; `/metrics` refreshes gauges under the lock and gathers without it.

pub mod access;
mod api;
mod control;
mod dashboard;
pub mod error;
mod events;

use crate::serve::App;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use error::ApiError;
use std::sync::Arc;

/// Largest request body: a 16 MiB payload in base64 inside JSON.
const MAX_BODY_BYTES: usize = 24 * 1024 * 1024;

/// Every route. Three groups: open (`/healthz`, `/livez` and the dashboard's static
/// files: the page asks for the token itself), reads (open unless
/// `--protect-reads`), and control (with `--api-token`, only with the token):
/// every command to agents, submitting tasks and replaying dead letters.
pub fn router(app: Arc<App>) -> Router {
    let reads = Router::new()
        .route("/metrics", get(api::metrics))
        .route("/api/events", get(events::stream))
        .route("/api/workers", get(api::workers))
        .route("/api/workers/{id}", get(api::worker))
        .route("/api/stages", get(api::stages))
        .route("/api/scaling", get(api::scaling))
        .route("/api/errors", get(api::errors))
        .route("/api/tasks", get(api::tasks))
        .route("/api/tasks/{id}", get(api::task))
        .route("/api/dead/{stage}", get(api::dead_list))
        .route_layer(from_fn_with_state(app.clone(), access::require_read));
    let control = Router::new()
        .route("/api/tasks", post(api::submit))
        .route("/api/dead/{stage}/replay", post(api::dead_replay))
        .route("/api/workers/{id}/pause", post(control::pause))
        .route("/api/workers/{id}/resume", post(control::resume))
        .route("/api/workers/{id}/drain", post(control::drain))
        .route("/api/workers/{id}/restart", post(control::restart))
        .route("/api/workers/{id}/concurrency", post(control::concurrency))
        .route("/api/workers/{id}/logs", get(control::logs))
        .route("/api/stages/{stage}/{action}", post(control::stage_command))
        .route_layer(from_fn_with_state(app.clone(), access::require_control));
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/livez", get(api::livez))
        .route("/", get(dashboard::index))
        .route("/dashboard/app.css", get(dashboard::css))
        .route("/dashboard/app.js", get(dashboard::js))
        .merge(reads)
        .merge(control)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
