//! `POST /api/tasks` with `"after"` (issue 19, flows): a task held by the
//! coordinator until the tasks it runs after have finished.
//!
//! The body is the submit body with `"after": ["ID", ...]` (1 to
//! `flow::MAX_AFTER` task ids; duplicates count once) and optionally
//! `"on_dependency_failure": "fail" | "run"` (default `fail`: a dependency
//! dead-lettered or cancelled dead-letters this task too). Answers:
//!
//! - 202 `{"id", "status", "stage", "priority", "after", "on_dependency_failure",
//!   "waiting_for": [ids still pending]}`, once the core has applied the
//!   `TaskHeld` this handler wrote: `status` is `held` (it waits), `queued`
//!   (every dependency had finished: it is being published now) or
//!   `dead_lettered` (a dependency had failed under `fail`; `failed_because`
//!   says which);
//! - 400: a malformed `after` (naming the entry), more than 64
//!   dependencies, a bad policy, `after` with a delay or a due time, the
//!   task after itself or a cycle, an unknown dependency (after waiting up
//!   to [`UNKNOWN_WAIT`] for it to be read: one submitted just before may
//!   not be yet);
//! - 404: no queue for the stage; 409: the id names a known task; 413: a
//!   payload over `flow::MAX_HELD_PAYLOAD` (held work is kept in the events
//!   stream); 429: too many held tasks; 503: the events stream cannot be
//!   written (or the coordinator is still replaying it); 504: the broker did
//!   not confirm within `--broker-timeout`, or the core did not read the
//!   `TaskHeld` back within [`APPLY_WAIT`] (it is in the stream: it holds).
//!
//! The route is `POST /api/tasks`, so its access rule is submitting's (the
//! control token when there is one).

use super::error::ApiError;
use crate::serve::App;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use guildhall_broker::now_ms;
use guildhall_broker::task::new_task_id;
use guildhall_broker::topology::probe_queue;
use guildhall_core::core::flows::{Decision, HoldError};
use guildhall_proto::flow::{
    AfterError, DependencyPolicy, MAX_AFTER, MAX_HELD_PAYLOAD, after_list,
};
use guildhall_proto::{Event, Priority, Stage, TaskHeld, TaskId};
use serde_json::{Value, json};
use std::time::Duration;

/// How long an unknown dependency is waited for before the request is
/// refused: a task submitted just before may not have been read yet.
pub const UNKNOWN_WAIT: Duration = Duration::from_secs(2);

/// How often the core is asked again meanwhile.
const UNKNOWN_POLL: Duration = Duration::from_millis(50);

/// How long the core has to read the `TaskHeld` back.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);

/// What a submit body's `after` and `on_dependency_failure` ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The tasks to run after, deduplicated, in order.
    pub after: Vec<TaskId>,
    /// What a failed dependency does.
    pub policy: DependencyPolicy,
}

/// A JSON value in an error message, cut short.
fn shown(v: &Value) -> String {
    v.to_string().chars().take(40).collect()
}

/// Reads `after` and `on_dependency_failure` from a submit body: `None`
/// without either (a plain submit), else the hold or a 400 naming what is
/// wrong.
pub fn hold_of(after: Option<&Value>, policy: Option<&Value>) -> Result<Option<Hold>, ApiError> {
    let after = match (after, policy) {
        (None | Some(Value::Null), None | Some(Value::Null)) => return Ok(None),
        (None | Some(Value::Null), Some(_)) => {
            return Err(ApiError::bad_request(
                "on_dependency_failure goes with after (the tasks to run after)",
            ));
        }
        (Some(after), _) => after,
    };
    let Some(list) = after.as_array() else {
        return Err(ApiError::bad_request(format!(
            "after must be a list of task ids, such as [\"A-1\", \"B-2\"] (got {})",
            shown(after)
        )));
    };
    let mut ids = Vec::with_capacity(list.len().min(MAX_AFTER + 1));
    for (i, v) in list.iter().enumerate() {
        let Some(id) = v.as_str() else {
            return Err(ApiError::bad_request(format!(
                "after[{i}] is not a task id (got {})",
                shown(v)
            )));
        };
        ids.push(id);
    }
    let after = after_list(ids).map_err(|e| {
        ApiError::bad_request(match e {
            AfterError::Id(e) => format!("after: {e}"),
            AfterError::TooMany => format!(
                "after lists more than {MAX_AFTER} dependencies (at most {MAX_AFTER} tasks)"
            ),
            AfterError::Empty => "after names no task: give at least one id".to_owned(),
        })
    })?;
    let policy = match policy {
        None | Some(Value::Null) => DependencyPolicy::default(),
        Some(v) => v
            .as_str()
            .and_then(DependencyPolicy::parse)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "on_dependency_failure must be \"fail\" or \"run\" (got {})",
                    shown(v)
                ))
            })?,
    };
    Ok(Some(Hold { after, policy }))
}

/// The refusal of a payload a held task cannot have, if it cannot.
pub fn check_payload(len: usize) -> Result<(), ApiError> {
    if len > MAX_HELD_PAYLOAD {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "payload of {len} bytes exceeds the {MAX_HELD_PAYLOAD}-byte limit of a task held with after (it is kept in the events stream until released)"
            ),
        ));
    }
    Ok(())
}

/// The API's answer to a refusal of the core's [`Core::check_hold`].
///
/// [`Core::check_hold`]: guildhall_core::core::Core::check_hold
pub fn refusal(e: &HoldError) -> ApiError {
    let status = match e {
        HoldError::Exists(_) => StatusCode::CONFLICT,
        HoldError::Unknown(_) | HoldError::Cycle(_) => StatusCode::BAD_REQUEST,
        HoldError::Full => StatusCode::TOO_MANY_REQUESTS,
    };
    ApiError::new(status, e.to_string())
}

/// Releases an id claimed for one request when the request ends.
struct Claim<'a> {
    app: &'a App,
    id: TaskId,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.app.flows.unclaim(&self.id);
    }
}

/// 404 unless `stage` has a queue (each queue found is remembered): a held
/// task for a stage nobody serves would wait for ever.
async fn check_stage(app: &App, stage: &Stage) -> Result<(), ApiError> {
    let queue = app.names.stage_queue(stage);
    if app.flows.found(&queue) {
        return Ok(());
    }
    let (conn, _) = app
        .link
        .get()
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    match probe_queue(&conn, &queue).await {
        Ok(Some(_)) => {
            app.flows.remember(queue);
            Ok(())
        }
        Ok(None) => Err(ApiError::not_found(format!(
            "unknown stage '{stage}': no queue {queue} exists (start a guildhall-agent --stage {stage} first)"
        ))),
        Err(e) => Err(ApiError::unavailable(e.to_string())),
    }
}

/// Asks the core whether `id` may be held after `after`, waiting up to
/// [`UNKNOWN_WAIT`] for an unknown dependency to be read.
async fn checked(app: &App, id: &TaskId, after: &[TaskId]) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + UNKNOWN_WAIT;
    loop {
        let (result, caught_up) = {
            let core = app.core();
            (core.check_hold(id, after), core.is_caught_up())
        };
        match result {
            Ok(()) => return Ok(()),
            Err(HoldError::Unknown(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(UNKNOWN_POLL).await;
            }
            Err(HoldError::Unknown(dep)) if !caught_up => {
                return Err(ApiError::unavailable(format!(
                    "dependency {dep} is not known yet and the coordinator is still replaying the events stream: try again in a moment"
                )));
            }
            Err(e) => return Err(refusal(&e)),
        }
    }
}

/// Holds a task: checks, writes `TaskHeld` (confirmed), waits for the core
/// to apply it, answers 202.
pub async fn submit(
    app: &App,
    stage: Stage,
    id: Option<TaskId>,
    payload: Vec<u8>,
    priority: Priority,
    hold: Hold,
) -> Result<Response, ApiError> {
    check_payload(payload.len())?;
    let timeout = app.http.config.broker_timeout;
    tokio::time::timeout(timeout, check_stage(app, &stage))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "the broker did not answer in time (--broker-timeout): nothing was held",
            )
        })??;
    let id = id.unwrap_or_else(new_task_id);
    if !app.flows.claim(&id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("task {id} is being submitted by another request"),
        ));
    }
    let _claim = Claim {
        app,
        id: id.clone(),
    };
    checked(app, &id, &hold.after).await?;
    let event = Event::TaskHeld(Box::new(TaskHeld {
        at_ms: now_ms(),
        task_id: id.clone(),
        stage: stage.clone(),
        priority,
        after: hold.after.clone(),
        on_dependency_failure: hold.policy,
        payload,
    }));
    super::write::confirmed(
        app,
        app.write_events(vec![event]),
        "cannot hold the task: the events stream cannot be written",
        "the broker did not confirm the held task in time: it may or may not be held; look for it with GET /api/tasks/{id} before sending it again",
    )
    .await?;
    if !super::write::applied(app, APPLY_WAIT, |core| {
        core.flows().held(id.as_str()).is_some()
    })
    .await
    {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "task {id} was written to the events stream but not read back yet: it is held when it is (GET /api/tasks/{id})"
            ),
        ));
    }
    let body = {
        let core = app.core();
        let h = core.flows().held(id.as_str());
        let pending: Vec<&str> =
            h.map_or_else(Vec::new, |h| h.pending.iter().map(TaskId::as_str).collect());
        let (status, failed_because) = match h.and_then(|h| h.decision.as_ref()) {
            None => ("held", None),
            Some(Decision::DeadLetter(why)) => ("dead_lettered", Some(why.clone())),
            Some(_) => ("queued", None),
        };
        let mut body = json!({
            "id": id.as_str(),
            "status": status,
            "stage": stage.as_str(),
            "priority": priority.get(),
            "after": hold.after.iter().map(TaskId::as_str).collect::<Vec<_>>(),
            "on_dependency_failure": hold.policy.as_str(),
            "waiting_for": pending,
        });
        if let Some(why) = failed_because {
            body["failed_because"] = json!(why);
        }
        body
    };
    tracing::debug!(task = %id, %stage, after = hold.after.len(), "task held through the API");
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The runtime's word on a held task or join decided but not published
/// yet because its stage cannot take it now, for `GET /api/tasks/{id}`'s
/// `flow.release`.
pub fn release_view(app: &App, id: &TaskId) -> Option<Value> {
    let stage = {
        let core = app.core();
        let flows = core.flows();
        if let Some(h) = flows.held(id.as_str()) {
            (h.decision.is_some() && !h.released).then(|| h.stage.clone())
        } else {
            flows
                .join(id.as_str())
                .filter(|j| !j.released && j.decision.is_some())
                .and_then(|j| j.join.clone().or_else(|| j.stage.clone()))
        }
    }?;
    let stall = app.flows.stall(&stage)?;
    Some(json!({
        "state": "retrying",
        "stage": stage.as_str(),
        "since_ms": stall.since_ms,
        "attempts": stall.attempts,
        "error": stall.last_error,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(after: Value, policy: Option<Value>) -> Result<Option<Hold>, ApiError> {
        hold_of(Some(&after), policy.as_ref())
    }

    #[test]
    fn a_plain_submit_has_no_hold() {
        assert_eq!(hold_of(None, None).unwrap(), None);
        assert_eq!(hold_of(Some(&Value::Null), None).unwrap(), None);
    }

    #[test]
    fn after_and_its_policy_are_read() {
        let h = hold(json!(["A-1", " B-2", "A-1"]), Some(json!("run")))
            .unwrap()
            .unwrap();
        let ids: Vec<&str> = h.after.iter().map(TaskId::as_str).collect();
        assert_eq!(ids, ["A-1", "B-2"]);
        assert_eq!(h.policy, DependencyPolicy::Run);
        let h = hold(json!(["A-1"]), None).unwrap().unwrap();
        assert_eq!(h.policy, DependencyPolicy::Fail);
    }

    #[test]
    fn bad_after_lists_are_refused_naming_the_entry() {
        let too_many: Vec<String> = (0..=MAX_AFTER).map(|i| format!("t{i}")).collect();
        for (after, policy, says) in [
            (json!("A-1"), None, "after must be a list of task ids"),
            (json!([]), None, "after names no task"),
            (json!(["A-1", 7]), None, "after[1] is not a task id (got 7)"),
            (
                json!(["A-1", "bad id"]),
                None,
                "after: invalid task id \"bad id\"",
            ),
            (
                json!(too_many),
                None,
                "after lists more than 64 dependencies",
            ),
            (
                json!(["A-1"]),
                Some(json!("maybe")),
                "on_dependency_failure must be",
            ),
            (
                json!(["A-1"]),
                Some(json!(1)),
                "on_dependency_failure must be",
            ),
        ] {
            let e = hold(after.clone(), policy).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{after}");
            assert!(e.message.starts_with(says), "{after}: {}", e.message);
        }
        let e = hold_of(None, Some(&json!("run"))).unwrap_err();
        assert!(e.message.contains("goes with after"), "{}", e.message);
        // 64 distinct ids (and repeats of them) are fine.
        let ok: Vec<String> = (0..MAX_AFTER * 2)
            .map(|i| format!("t{}", i % MAX_AFTER))
            .collect();
        assert_eq!(
            hold(json!(ok), None).unwrap().unwrap().after.len(),
            MAX_AFTER
        );
    }

    #[test]
    fn the_held_payload_limit_is_413_and_refusals_have_their_status() {
        assert!(check_payload(MAX_HELD_PAYLOAD).is_ok());
        assert_eq!(
            check_payload(MAX_HELD_PAYLOAD + 1).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let id = TaskId::new("A").unwrap();
        for (e, status) in [
            (HoldError::Exists(id.clone()), StatusCode::CONFLICT),
            (HoldError::Unknown(id.clone()), StatusCode::BAD_REQUEST),
            (HoldError::Cycle("A -> A".into()), StatusCode::BAD_REQUEST),
            (HoldError::Full, StatusCode::TOO_MANY_REQUESTS),
        ] {
            assert_eq!(refusal(&e).status, status, "{e}");
        }
        assert!(
            refusal(&HoldError::Unknown(id))
                .message
                .contains("never seen, or finished before the coordinator's task retention")
        );
    }
}
