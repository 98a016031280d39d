//! The HTTP side: the dashboard, JSON API, Server-Sent Events, `/metrics`
//! and `/healthz` (axum on hyper).
//!
//! # Layout
//!
//! - `server`: the accept loop and connections (time-outs, connection
//!   limit, shedding), with `conns`, the connection tracker;
//! - `api`: read endpoints and submitting;
//! - `held`: submitting a task held until others finish (`after`, issue 19);
//! - `dead_letters`: listing and replaying dead letters, on a shared
//!   connection, bounded in time and concurrency;
//! - `control`: commands to workers and stages;
//! - `scale`: `POST /api/stages/{stage}/scale`, scaling by hand through
//!   the actuator (issue 21);
//! - `events`: `GET /api/events` (SSE);
//! - `flows`: `GET /api/flows/{id}`, a flow as a graph (issue 19);
//! - `results`: `GET /api/results/{id}`, a fan-out child's result, stored
//!   ones read from `<ns>.results` (issue 19);
//! - `access`: the bearer token (`--api-token`, `--protect-reads`);
//! - `hosts`: `--allowed-hosts` and cross-origin POSTs;
//! - `body`: JSON request bodies (type, size, time);
//! - `redact`: worker-written text withheld from readers without the token;
//! - `dashboard`: the page, its CSS and JS, embedded in the binary;
//! - `error`: the JSON error type.
//!
//! Handlers lock the core only to build a view, then serialize outside the
//! lock; `/metrics` refreshes gauges under the lock and gathers without it.

pub mod access;
mod api;
mod body;
mod cancel;
pub mod conns;
mod control;
mod dashboard;
pub mod dead_letters;
pub mod error;
mod events;
mod flows;
mod held;
pub mod hosts;
mod rate_limits;
pub mod redact;
pub mod results;
pub mod scale;
pub mod schedules;
pub mod server;
mod write;

use crate::serve::App;
use crate::serve::link::BrokerLink;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::middleware::from_fn_with_state;
use axum::routing::{delete, get, post, put};
use body::JsonBody;
use error::ApiError;
use hosts::AllowedHosts;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Largest request body: a 16 MiB payload in base64 inside JSON.
const MAX_BODY_BYTES: usize = 24 * 1024 * 1024;
/// Largest body of a replay: 10,000 ids of up to 128 characters.
const MAX_REPLAY_BYTES: usize = 2 * 1024 * 1024;
/// Largest body of a small command (`{"concurrency": N}`).
const MAX_COMMAND_BYTES: usize = 1024;

/// The HTTP server's limits, from the flags.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Most connections open at once (fewer if the open-files limit leaves
    /// less room); idle ones are shed to admit new ones.
    pub max_connections: usize,
    /// Longest wait for a complete request head (slowloris).
    pub header_timeout: Duration,
    /// Longest a kept-alive connection waits for its next request, and a
    /// response may make no progress.
    pub idle_timeout: Duration,
    /// Longest a JSON request body may take to arrive.
    pub body_timeout: Duration,
    /// Most `GET /api/events` streams open at once.
    pub max_event_streams: usize,
    /// Longest a request waits on the broker (submitting, dead letters).
    pub broker_timeout: Duration,
    /// Host names served besides IP addresses and `localhost`.
    pub allowed_hosts: AllowedHosts,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            max_event_streams: 32,
            broker_timeout: Duration::from_secs(30),
            allowed_hosts: AllowedHosts::default(),
        }
    }
}

/// What the HTTP side keeps to enforce its limits.
pub struct HttpState {
    /// The limits.
    pub config: HttpConfig,
    /// Places for open event streams.
    pub event_streams: Arc<Semaphore>,
    /// The dead-letter calls' connection and turns.
    pub dead_letters: dead_letters::DeadLetters,
}

impl HttpState {
    /// The state for `config`; dead-letter calls connect through `link`.
    pub fn new(config: HttpConfig, link: BrokerLink) -> Self {
        Self {
            event_streams: Arc::new(Semaphore::new(config.max_event_streams)),
            dead_letters: dead_letters::DeadLetters::new(link),
            config,
        }
    }
}

/// Every route. Three groups: open (`/healthz`, `/livez` and the dashboard's static
/// files: the page asks for the token itself), reads (open unless
/// `--protect-reads`), and control (with `--api-token`, only with the token):
/// every command to agents, submitting tasks and replaying dead letters.
/// Every route checks the `Host` (and a POST its `Origin`) first; every POST
/// with a JSON body goes through [`body::json_body`].
pub fn router(app: Arc<App>) -> Router {
    let json = |limit: usize| {
        from_fn_with_state(
            JsonBody {
                limit,
                timeout: app.http.config.body_timeout,
            },
            body::json_body,
        )
    };
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
        .route("/api/flows/{id}", get(flows::flow))
        .route("/api/results/{id}", get(results::result))
        .route("/api/cluster", get(api::cluster))
        .route("/api/dead/{stage}", get(dead_letters::list))
        .route("/api/schedules", get(schedules::list))
        .route("/api/schedules/{name}", get(schedules::one))
        .route_layer(from_fn_with_state(app.clone(), access::require_read));
    let control = Router::new()
        .route(
            "/api/tasks",
            post(api::submit).route_layer(json(MAX_BODY_BYTES)),
        )
        .route(
            "/api/dead/{stage}/replay",
            post(dead_letters::replay).route_layer(json(MAX_REPLAY_BYTES)),
        )
        .route("/api/workers/{id}/pause", post(control::pause))
        .route("/api/workers/{id}/resume", post(control::resume))
        .route("/api/workers/{id}/drain", post(control::drain))
        .route("/api/workers/{id}/restart", post(control::restart))
        .route(
            "/api/workers/{id}/concurrency",
            post(control::concurrency).route_layer(json(MAX_COMMAND_BYTES)),
        )
        .route("/api/workers/{id}/logs", get(control::logs))
        .route("/api/stages/{stage}/{action}", post(control::stage_command))
        .route(
            "/api/schedules",
            post(schedules::upsert).route_layer(json(schedules::MAX_SCHEDULE_BODY)),
        )
        .route("/api/schedules/{name}", delete(schedules::remove))
        .route("/api/schedules/{name}/{action}", post(schedules::action))
        // Cancelling tasks (issue 18).
        .route("/api/tasks/{id}", delete(cancel::cancel_one))
        .route(
            "/api/tasks/cancel",
            post(cancel::cancel_bulk).route_layer(json(MAX_REPLAY_BYTES)),
        )
        .route(
            "/api/stages/{stage}/rate-limit",
            put(rate_limits::put).route_layer(json(MAX_COMMAND_BYTES)),
        )
        .route(
            "/api/stages/{stage}/scale",
            post(scale::scale).route_layer(json(MAX_COMMAND_BYTES)),
        )
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
        .layer(from_fn_with_state(app.clone(), hosts::check))
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
