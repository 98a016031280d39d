//! The agent's own health probes, for an orchestrator (`--probe-listen`):
//!
//! | path | 200 when | otherwise |
//! |---|---|---|
//! | `GET /livez` | the main loop went round within [`LIVENESS_WINDOW`], or it is waiting on the broker, or the agent is stopping | 503: the agent is wedged; restarting it is the cure |
//! | `GET /readyz` | connected to the broker, and consuming or deliberately paused | 503: connecting, reconnecting, waiting for its worker, or draining |
//!
//! Both answer JSON: `{"status", "state", "connected", "loop_age_ms",
//! "waiting_on_broker", "reason"?}`. A lost or blocking broker (a memory or
//! disk alarm stalls the loop inside a broker call for as long as it lasts)
//! makes the agent unready at worst, never unalive: it reconnects by itself,
//! and a restart would only drop the tasks in hand. Nothing is served before
//! the first broker connection: the probes answer once the agent has
//! connected (a first connection that fails ends the process).
//! Anything else than these two paths is a JSON 404.

use crate::config::ConfigError;
use crate::state::Shared;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use guildhall_proto::AgentState;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Longest the main loop may go without turning round before `/livez`
/// fails, unless it is waiting on the broker. The loop turns at least every
/// round-trip probe interval (5 s).
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(60);

/// Binds the probe address (before anything else, so a taken port is a
/// start-up error, not a silent absence of probes).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ConfigError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        ConfigError::invalid("--probe-listen", format!("cannot listen on {addr}: {e}"))
    })
}

/// Serves the probes on `listener` until the returned task is aborted.
pub fn spawn(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("probes on http://{addr}/livez and /readyz");
    }
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(shared);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::warn!("the probe server stopped: {err}");
        }
    })
}

/// What both probes report.
#[derive(Debug, serde::Serialize)]
struct Report {
    /// `ok` or `unavailable`.
    status: &'static str,
    /// The state heartbeats report (`idle`, `processing`, `paused`, ...).
    state: &'static str,
    /// Whether the agent has a broker connection now.
    connected: bool,
    /// How long ago the main loop last went round.
    loop_age_ms: u64,
    /// Whether the loop is inside a broker call now.
    waiting_on_broker: bool,
    /// Why the probe fails; absent when it passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Liveness of an agent in `state` whose loop last turned `loop_age` ago,
/// and is or is not `waiting_on_broker`.
pub fn live(state: AgentState, loop_age: Duration, waiting_on_broker: bool) -> Result<(), String> {
    if state == AgentState::Draining || waiting_on_broker || loop_age <= LIVENESS_WINDOW {
        Ok(())
    } else {
        Err(format!(
            "the main loop has not turned for {}s",
            loop_age.as_secs()
        ))
    }
}

/// Readiness of an agent in `state`, connected or not.
pub fn ready(state: AgentState, connected: bool) -> Result<(), String> {
    match state {
        _ if !connected => Err("not connected to the broker".into()),
        AgentState::Idle | AgentState::Processing | AgentState::Paused => Ok(()),
        AgentState::Starting => Err("waiting for the worker to be ready".into()),
        AgentState::Draining => Err("draining: finishing the tasks in hand, then exiting".into()),
    }
}

/// Everything a probe reads, read once so the verdict and the body agree.
struct Reading {
    state: AgentState,
    connected: bool,
    loop_age: Duration,
    waiting_on_broker: bool,
}

fn read(shared: &Shared) -> Reading {
    Reading {
        state: shared.state(),
        connected: shared.connected(),
        loop_age: shared.loop_age(),
        waiting_on_broker: shared.is_waiting_on_broker(),
    }
}

fn answer(r: &Reading, verdict: Result<(), String>) -> Response {
    let report = Report {
        status: if verdict.is_ok() { "ok" } else { "unavailable" },
        state: r.state.as_str(),
        connected: r.connected,
        loop_age_ms: u64::try_from(r.loop_age.as_millis()).unwrap_or(u64::MAX),
        waiting_on_broker: r.waiting_on_broker,
        reason: verdict.err(),
    };
    let code = if report.reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report)).into_response()
}

async fn livez(State(shared): State<Arc<Shared>>) -> Response {
    let r = read(&shared);
    answer(&r, live(r.state, r.loop_age, r.waiting_on_broker))
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let r = read(&shared);
    answer(&r, ready(r.state, r.connected))
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": "no such probe: use /livez or /readyz" })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_broker_is_unready_but_alive() {
        assert!(ready(AgentState::Idle, false).is_err());
        assert!(live(AgentState::Idle, Duration::from_secs(1), false).is_ok());
    }

    #[test]
    fn consuming_or_paused_is_ready_starting_and_draining_are_not() {
        assert!(ready(AgentState::Idle, true).is_ok());
        assert!(ready(AgentState::Processing, true).is_ok());
        assert!(ready(AgentState::Paused, true).is_ok());
        assert!(ready(AgentState::Starting, true).is_err());
        assert!(ready(AgentState::Draining, true).is_err());
    }

    #[test]
    fn a_stuck_loop_is_not_alive_unless_draining() {
        let stuck = LIVENESS_WINDOW + Duration::from_secs(1);
        assert!(live(AgentState::Processing, stuck, false).is_err());
        assert!(live(AgentState::Draining, stuck, false).is_ok());
        assert!(live(AgentState::Processing, LIVENESS_WINDOW, false).is_ok());
    }

    #[test]
    fn a_loop_stalled_by_a_blocking_broker_is_still_alive() {
        // A memory or disk alarm blocks the connection inside a broker call
        // for as long as it lasts; restarting the agent would not help.
        let stuck = LIVENESS_WINDOW * 10;
        assert!(live(AgentState::Idle, stuck, true).is_ok());
    }
}
