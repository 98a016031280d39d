//! `GET /api/events`: Server-Sent Events that keep the dashboard live.
//!
//! Every [`TICK`] the connection's views are rebuilt and compared with what
//! this connection last sent; only what changed goes out:
//!
//! - `workers`: `{"now_ms", "full", "workers": [...], "removed": [ids]}`.
//!   The first is `full` (every worker); later ones carry the workers whose
//!   view changed and the ids that went away. Fields that change on every
//!   tick by themselves (`*_ago_ms`, a running task's `running_ms`) do not
//!   count as a change: the page ages them from `now_ms`.
//! - `stages`, `scaling`, `errors`: the bodies of `GET /api/stages`,
//!   `GET /api/scaling` and `GET /api/errors`, when they changed.
//!
//! A browser's `EventSource` reconnects by itself (after a coordinator
//! restart too), and a new connection starts with full state. Streams end
//! when the server shuts down, so they never hold a graceful shutdown up.
//!
//! Each stream costs a view of every worker per second, so at most
//! `--http-max-event-streams` are open at once (`guildhall_http_event_streams`);
//! past that a new one gets 503. A reader without the token gets `errors`
//! with the sample messages withheld ([`super::redact`]).

use super::error::ApiError;
use super::redact::{self, ReadScope};
use crate::serve::App;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_lite::Stream;
use guildhall_broker::now_ms;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, watch};

/// How often views are compared.
const TICK: Duration = Duration::from_secs(1);

/// One of the `--http-max-event-streams` places, held while a stream is open.
struct Slot {
    /// The place.
    _permit: OwnedSemaphorePermit,
    /// `guildhall_http_event_streams`, decremented when the stream ends.
    gauge: prometheus::IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// What one connection has sent so far.
struct Conn {
    app: Arc<App>,
    /// Its place among the open streams.
    _slot: Slot,
    /// Whether the reader may see worker-written text.
    scope: ReadScope,
    /// Flips when the server shuts down.
    closing: watch::Receiver<bool>,
    /// Events built but not yet sent.
    queue: VecDeque<Event>,
    /// Fingerprint of each worker's last sent view.
    workers: HashMap<String, String>,
    /// The last sent `stages`, `scaling` and `errors` bodies.
    stages: String,
    scaling: String,
    errors: String,
    /// Whether the first (full) round went out.
    started: bool,
    ticker: tokio::time::Interval,
}

/// The SSE stream of one client; 503 when `--http-max-event-streams` are open.
pub async fn stream(
    State(app): State<Arc<App>>,
    scope: ReadScope,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let permit = app
        .http
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::unavailable(format!(
                "too many event streams open (--http-max-event-streams {}): close one, or try again later",
                app.http.config.max_event_streams
            ))
        })?;
    let gauge = app.metrics.http_event_streams.clone();
    gauge.inc();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let conn = Conn {
        closing: app.closing.clone(),
        app,
        _slot: Slot {
            _permit: permit,
            gauge,
        },
        scope,
        queue: VecDeque::new(),
        workers: HashMap::new(),
        stages: String::new(),
        scaling: String::new(),
        errors: String::new(),
        started: false,
        ticker,
    };
    let stream = futures_lite::stream::unfold(conn, |mut conn| async move {
        loop {
            if let Some(event) = conn.queue.pop_front() {
                return Some((Ok(event), conn));
            }
            if *conn.closing.borrow() {
                return None;
            }
            tokio::select! {
                _ = conn.ticker.tick() => conn.round(),
                _ = conn.closing.changed() => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// `value` without the fields that change by themselves as time passes.
fn fingerprint(value: &Value) -> String {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(k, _)| !k.ends_with("_ago_ms") && k.as_str() != "running_ms")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    strip(value).to_string()
}

impl Conn {
    /// Builds this tick's events.
    fn round(&mut self) {
        let now = now_ms();
        let (workers, stages, scaling, errors) = {
            let core = self.app.core();
            (
                core.workers_view(now),
                core.stages_view(now),
                core.scaling_view(now),
                core.errors_view(now),
            )
        };
        let full = !self.started;
        self.started = true;
        let mut changed = Vec::new();
        let mut seen = HashMap::with_capacity(workers.len());
        for w in workers {
            let value = serde_json::to_value(&w).unwrap_or(Value::Null);
            let print = fingerprint(&value);
            if full || self.workers.get(&w.id) != Some(&print) {
                changed.push(value);
            }
            seen.insert(w.id, print);
        }
        let removed: Vec<String> = self
            .workers
            .keys()
            .filter(|id| !seen.contains_key(*id))
            .cloned()
            .collect();
        self.workers = seen;
        if full || !changed.is_empty() || !removed.is_empty() {
            let body = json!({"now_ms": now, "full": full, "workers": changed, "removed": removed});
            self.push("workers", &body);
        }
        let stages = serde_json::to_value(&stages).unwrap_or(Value::Null);
        let print = stages.to_string();
        if print != self.stages {
            self.stages = print;
            self.push("stages", &stages);
        }
        let mut scaling = serde_json::to_value(&scaling).unwrap_or(Value::Null);
        scaling["dry_run"] = json!(self.app.dry_run);
        scaling["manual"] = json!(self.app.manual_scales.list());
        let print = scaling.to_string();
        if print != self.scaling {
            self.scaling = print;
            self.push("scaling", &scaling);
        }
        let mut errors = serde_json::to_value(&errors).unwrap_or(Value::Null);
        if !self.scope.full {
            redact::errors(&mut errors);
        }
        let print = errors.to_string();
        if print != self.errors {
            self.errors = print;
            self.push("errors", &errors);
        }
    }

    fn push(&mut self, name: &str, body: &Value) {
        self.queue
            .push_back(Event::default().event(name).data(body.to_string()));
    }
}
