//! The HTTP side: JSON API, `/metrics` and `/healthz` (axum on hyper).
//!
//! Handlers lock the core only to build a view, then serialize outside the
//! lock; `/metrics` refreshes gauges under the lock and gathers without it.

mod api;
pub mod error;

use crate::serve::App;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use error::ApiError;
use std::sync::Arc;

/// Largest request body: a 16 MiB payload in base64 inside JSON.
const MAX_BODY_BYTES: usize = 24 * 1024 * 1024;

/// Every route.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/api/workers", get(api::workers))
        .route("/api/workers/{id}", get(api::worker))
        .route("/api/stages", get(api::stages))
        .route("/api/scaling", get(api::scaling))
        .route("/api/tasks", get(api::tasks).post(api::submit))
        .route("/api/tasks/{id}", get(api::task))
        .route("/api/dead/{stage}", get(api::dead_list))
        .route("/api/dead/{stage}/replay", post(api::dead_replay))
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
