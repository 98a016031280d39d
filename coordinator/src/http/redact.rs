//! Text written by workers is withheld from readers without the token.
//!
//! Payload previews (dead letters) and free text a worker wrote (error
//! messages and samples, a task's attempt errors, why a task of a flow was
//! dead-lettered) can echo a task's payload, so when the coordinator has an
//! `--api-token` they go only to readers who present it. Everything else a
//! read shows (statuses, counts, classes, ids, metrics) stays open. A
//! withheld field is `null` and the object that held it says
//! `"redacted": true`: never a silent empty string.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde_json::Value;
use std::convert::Infallible;

/// What a reader may see, set by the read access middleware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadScope {
    /// Whether worker-written text is shown: no token is configured, or the
    /// request carries it.
    pub full: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for ReadScope {
    type Rejection = Infallible;

    /// The scope the middleware set; withheld if none did (fail closed).
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(parts
            .extensions
            .get::<ReadScope>()
            .copied()
            .unwrap_or(ReadScope { full: false }))
    }
}

/// Sets each of `fields` present and not null in `object` to null, and marks
/// the object `"redacted": true` if any was.
fn withhold(object: &mut Value, fields: &[&str]) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    let mut any = false;
    for field in fields {
        if let Some(v) = map.get_mut(*field)
            && !v.is_null()
        {
            *v = Value::Null;
            any = true;
        }
    }
    if any {
        map.insert("redacted".into(), Value::Bool(true));
    }
}

/// Each object of the array `value[key]`.
fn each<'a>(value: &'a mut Value, key: &str) -> impl Iterator<Item = &'a mut Value> {
    value
        .get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

/// `GET /api/errors` (and the `errors` event): sample messages.
pub fn errors(view: &mut Value) {
    for class in each(view, "classes") {
        for sample in each(class, "samples") {
            withhold(sample, &["message"]);
        }
    }
}

/// `GET /api/tasks/{id}`: each attempt's error, and why the coordinator
/// dead-lettered a task of a flow (`flow.failed_because`), which quotes a
/// failed dependency's or child's error as its worker wrote it.
pub fn task(view: &mut Value) {
    for attempt in each(view, "attempts") {
        withhold(attempt, &["error"]);
    }
    if let Some(flow) = view.get_mut("flow") {
        withhold(flow, &["failed_because"]);
    }
}

/// `GET /api/dead/{stage}`: each dead letter's payload preview and error.
pub fn dead_letters(listing: &mut Value) {
    for task in each(listing, "tasks") {
        withhold(task, &["payload_preview", "error"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_samples_lose_their_message_and_say_so() {
        let mut v = json!({"classes": [{"stage": "a", "error_class": "http_500", "count": 2,
            "samples": [{"task_id": "T1", "message": "card 4111 1111 1111 1111", "attempt": 1}]}]});
        errors(&mut v);
        let s = &v["classes"][0]["samples"][0];
        assert_eq!(s["message"], Value::Null);
        assert_eq!(s["redacted"], true);
        assert_eq!(s["task_id"], "T1");
        assert_eq!(v["classes"][0]["error_class"], "http_500");
        assert!(!v.to_string().contains("4111"));
    }

    #[test]
    fn attempts_without_an_error_are_left_alone() {
        let mut v = json!({"id": "T", "attempts": [
            {"stage": "a", "error": null, "outcome": "succeeded"},
            {"stage": "b", "error": "echo: secret", "error_class": "exit_1"}]});
        task(&mut v);
        assert_eq!(v["attempts"][0].get("redacted"), None);
        assert_eq!(v["attempts"][1]["error"], Value::Null);
        assert_eq!(v["attempts"][1]["redacted"], true);
        assert_eq!(v["attempts"][1]["error_class"], "exit_1");
    }

    #[test]
    fn a_flow_loses_why_it_failed_and_keeps_its_shape() {
        let mut v = json!({"id": "D", "attempts": [], "flow": {
            "root": "P", "parent": null, "index": null, "children": null,
            "after": [{"id": "P:7", "status": "dead_lettered", "waiting": false}],
            "on_dependency_failure": "fail", "waiting_for": [], "dependents": [],
            "failed_because": "dependency P:7 dead-lettered at work: card 4111 1111 1111 1111"}});
        task(&mut v);
        let f = &v["flow"];
        assert_eq!(f["failed_because"], Value::Null);
        assert_eq!(f["redacted"], true);
        assert_eq!(f["after"][0]["id"], "P:7");
        assert_eq!(f["after"][0]["status"], "dead_lettered");
        assert!(!v.to_string().contains("4111"));
        // Not failed, or in no flow: nothing withheld, nothing marked.
        let mut ok =
            json!({"id": "P", "attempts": [], "flow": {"root": "P", "failed_because": null}});
        task(&mut ok);
        assert_eq!(ok["flow"].get("redacted"), None);
        let mut none = json!({"id": "T", "attempts": [], "flow": null});
        task(&mut none);
        assert_eq!(none, json!({"id": "T", "attempts": [], "flow": null}));
    }

    #[test]
    fn dead_letters_lose_previews_even_empty_ones() {
        let mut v = json!({"stage": "a", "count": 2, "tasks": [
            {"id": "T1", "payload_preview": "secret", "payload_bytes": 6, "error": "boom"},
            {"id": "T2", "payload_preview": "", "payload_bytes": 0, "error": null}]});
        dead_letters(&mut v);
        for t in v["tasks"].as_array().unwrap() {
            assert_eq!(t["payload_preview"], Value::Null);
            assert_eq!(t["error"], Value::Null);
            assert_eq!(t["redacted"], true);
        }
        assert_eq!(v["tasks"][0]["payload_bytes"], 6);
        // Shapes it does not know are left as they are.
        let mut odd = json!({"tasks": "x"});
        dead_letters(&mut odd);
        assert_eq!(odd, json!({"tasks": "x"}));
    }
}
