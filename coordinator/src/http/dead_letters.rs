//! `GET /api/dead/{stage}` and `POST /api/dead/{stage}/replay`.
//!
//! Every call (and every read of a stored flow result, `results.rs`) shares
//! one broker connection ([`DeadLetters::link`], its own,
//! so a broker error there cannot disturb submissions or the events
//! consumer), at most [`DEAD_LETTER_WORK`] run at once, calls on one stage
//! take turns (a listing holds the messages it has seen until it is done, so
//! two at once would each see part of the queue) and listings that waited
//! share the next one's result, and each must be done within
//! `--broker-timeout`, waiting for its turn included: past it the answer is
//! 504 with a JSON message. The work runs in a task of its own, so
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
use std::sync::{Arc, Mutex};
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
    /// The turn of each stage with a call running or waiting (removed when
    /// the last one is done, so unknown stages leave nothing behind).
    stages: Arc<Mutex<HashMap<Stage, Arc<tokio::sync::Mutex<StageState>>>>>,
}

/// What calls on one stage share while some run or wait.
#[derive(Default)]
struct StageState {
    /// The last listing, when it started and how many it asked for.
    listing: Option<(Instant, usize, dead::Listing)>,
}

impl StageState {
    /// The last listing, if it started after `requested` (so it is as fresh
    /// as one made now) and asked for at least `limit`.
    fn fresh_listing(&self, requested: Instant, limit: usize) -> Option<dead::Listing> {
        let (started, asked, listing) = self.listing.as_ref()?;
        if *started < requested || *asked < limit {
            return None;
        }
        let mut listing = listing.clone();
        listing.tasks.truncate(limit);
        Some(listing)
    }
}

/// A call's turn at its stage; gives it back on drop.
struct StageTurn {
    /// The held state.
    state: Option<tokio::sync::OwnedMutexGuard<StageState>>,
    /// The stage.
    stage: Stage,
    /// The map to tidy.
    stages: Arc<Mutex<HashMap<Stage, Arc<tokio::sync::Mutex<StageState>>>>>,
}

impl StageTurn {
    fn state(&mut self) -> &mut StageState {
        self.state.as_mut().expect("held until dropped")
    }
}

impl Drop for StageTurn {
    fn drop(&mut self) {
        drop(self.state.take());
        let mut stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        if stages
            .get(&self.stage)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            stages.remove(&self.stage);
        }
    }
}

impl DeadLetters {
    /// Calls on `link`, [`DEAD_LETTER_WORK`] at a time.
    pub fn new(link: BrokerLink) -> Self {
        Self {
            link,
            work: Arc::new(Semaphore::new(DEAD_LETTER_WORK)),
            stages: Arc::default(),
        }
    }

    /// Waits for the turn of `stage`.
    async fn turn(&self, stage: &Stage) -> StageTurn {
        let lock = self
            .stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(stage.clone())
            .or_default()
            .clone();
        let state = lock.lock_owned().await;
        StageTurn {
            state: Some(state),
            stage: stage.clone(),
            stages: self.stages.clone(),
        }
    }

    /// Stages with a call running or waiting.
    #[cfg(test)]
    fn stages_held(&self) -> usize {
        self.stages.lock().unwrap_or_else(|e| e.into_inner()).len()
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

/// Runs `call` in a task of its own, within `--broker-timeout`, and turns
/// its failure into an answer.
async fn detached<T, Fut>(
    app: &Arc<App>,
    what: &str,
    call: impl FnOnce(Arc<App>, Instant) -> Fut,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, DeadError>> + Send + 'static,
{
    let timeout = app.http.config.broker_timeout;
    let deadline = Instant::now() + timeout;
    match tokio::spawn(call(app.clone(), deadline)).await {
        Ok(result) => result.map_err(|e| dead_error(e, what, timeout)),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what} failed: {e}"),
        )),
    }
}

/// The turn of `stage`, by `deadline`.
async fn take_turn(app: &App, stage: &Stage, deadline: Instant) -> Result<StageTurn, DeadError> {
    tokio::time::timeout_at(deadline, app.http.dead_letters.turn(stage))
        .await
        .map_err(|_| DeadError::TimedOut)
}

/// Runs `call` on the shared connection, once a place is free, by `deadline`.
pub(super) async fn on_broker<T, F, Fut>(
    app: &App,
    deadline: Instant,
    call: F,
) -> Result<T, DeadError>
where
    F: FnOnce(Arc<Connection>, Publisher) -> Fut,
    Fut: Future<Output = Result<T, DeadError>>,
{
    let dead = &app.http.dead_letters;
    let _place = tokio::time::timeout_at(deadline, dead.work.clone().acquire_owned())
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
    call(conn, publisher).await
}

/// `GET /api/dead/{stage}?limit=N`: dead-lettered tasks, left in place.
/// Listings that waited for the stage's turn while another one ran take
/// its result if it started after they arrived (a hundred at once cost one
/// or two walks through the queue).
pub async fn list(
    State(app): State<Arc<App>>,
    scope: ReadScope,
    Path(stage): Path<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let requested = Instant::now();
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
    let listing = detached(
        &app,
        "listing the dead letters",
        move |app, deadline| async move {
            let mut turn = take_turn(&app, &stage, deadline).await?;
            if let Some(listing) = turn.state().fresh_listing(requested, limit) {
                return Ok(listing);
            }
            let started = Instant::now();
            let names = app.names.clone();
            let listing = on_broker(&app, deadline, |conn, _| async move {
                dead::list(&conn, &names, &stage, limit, deadline).await
            })
            .await?;
            turn.state().listing = Some((started, limit, listing.clone()));
            Ok(listing)
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
    let req: ReplayBody = super::body::parse(body)?;
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
    let replay_stage = stage.clone();
    let replayed = detached(&app, "the replay", move |app, deadline| async move {
        let mut turn = take_turn(&app, &replay_stage, deadline).await?;
        turn.state().listing = None;
        let names = app.names.clone();
        on_broker(&app, deadline, |conn, publisher| async move {
            dead::replay(
                &conn,
                &publisher,
                &names,
                &replay_stage,
                &selection,
                deadline,
            )
            .await
        })
        .await
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use guildhall_broker::AmqpUrls;

    fn dead_letters() -> DeadLetters {
        let url = AmqpUrls::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        DeadLetters::new(BrokerLink::new(url, "test".into()))
    }

    #[tokio::test]
    async fn calls_on_one_stage_take_turns_and_leave_nothing_behind() {
        let d = Arc::new(dead_letters());
        let (a, b) = (Stage::new("a").unwrap(), Stage::new("b").unwrap());
        let first = d.turn(&a).await;
        // Another stage goes ahead; the same stage waits.
        let other = d.turn(&b).await;
        let waiting = tokio::spawn({
            let (d, a) = (d.clone(), a.clone());
            async move { d.turn(&a).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.stages_held(), 2);
        drop((second, other));
        assert_eq!(d.stages_held(), 0);
    }

    #[test]
    fn a_listing_is_shared_only_with_requests_older_than_it_and_asking_no_more() {
        let listing = dead::Listing {
            stage: "a".into(),
            count: 3,
            tasks: Vec::new(),
        };
        let before = Instant::now();
        let started = before + Duration::from_millis(10);
        let state = StageState {
            listing: Some((started, 100, listing.clone())),
        };
        assert_eq!(state.fresh_listing(before, 100), Some(listing.clone()));
        assert_eq!(state.fresh_listing(before, 5).map(|l| l.count), Some(3));
        // Asked after it started: it may miss what came since.
        assert_eq!(
            state.fresh_listing(started + Duration::from_millis(1), 100),
            None
        );
        // Asked for more than it took.
        assert_eq!(state.fresh_listing(before, 101), None);
        assert_eq!(StageState::default().fresh_listing(before, 1), None);
    }
}
