//! `guildhall status` and `guildhall trace`: read a running coordinator's
//! API and print tables (or the JSON with `--json`).

use super::render::{Table, bytes, clock, duration, ellipsize, opt, percent};
use super::{ClientArgs, TraceArgs};
use crate::config::ConfigError;
use serde_json::{Value, json};
use std::time::Duration;

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator did not answer.
    #[error(
        "cannot reach the coordinator at {url} ({source}); is `guildhall serve` or `guildhall demo` running? (--api-url)"
    )]
    Unreachable {
        /// The API URL.
        url: String,
        /// The HTTP error.
        source: reqwest::Error,
    },
    /// The coordinator answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The status and the coordinator's message (`404 Not Found: ...`).
        message: String,
    },
}

impl ClientError {
    /// Whether the coordinator refused the request as bad input: a 400 or
    /// a 404 (an unknown task, schedule or stage).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ClientError::Api {
                status: 400 | 404,
                ..
            }
        )
    }

    /// The error of a command: bad input (see [`ClientError::is_bad_input`])
    /// is a [`ConfigError`] (one line, exit status 2), anything else (the
    /// coordinator unreachable, 401, 503, 504, ...) exit status 1.
    pub fn into_command_error(self) -> anyhow::Error {
        if self.is_bad_input() {
            ConfigError(self.to_string()).into()
        } else {
            self.into()
        }
    }
}

async fn get(args: &ClientArgs, path: &str) -> Result<Value, ClientError> {
    request(args, reqwest::Method::GET, path, None).await
}

/// Calls the API with the token, if any; an error answer becomes
/// [`ClientError::Api`] with the coordinator's message.
pub(crate) async fn request(
    args: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ClientError> {
    let base = args.api_url.trim_end_matches('/');
    let url = format!("{base}{path}");
    let client = reqwest::Client::builder()
        // Longer than the coordinator's own wait for an agent's answer.
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|source| ClientError::Unreachable {
            url: base.to_owned(),
            source,
        })?;
    let mut req = client.request(method, &url);
    if let Some(token) = args.api_token.as_deref().filter(|t| !t.is_empty()) {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let response = req
        .send()
        .await
        .map_err(|source| ClientError::Unreachable {
            url: base.to_owned(),
            source,
        })?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|source| ClientError::Unreachable {
            url: base.to_owned(),
            source,
        })?;
    if !status.is_success() {
        let msg = body["error"].as_str().unwrap_or("no error message");
        return Err(ClientError::Api {
            status: status.as_u16(),
            message: format!("{status}: {msg}"),
        });
    }
    Ok(body)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |m| duration(m.round() as u64))
}

/// `guildhall status`: workers and stages.
pub async fn status(args: &ClientArgs) -> Result<String, ClientError> {
    let workers = get(args, "/api/workers").await?;
    let stages = get(args, "/api/stages").await?;
    if args.json {
        let out = json!({ "workers": workers["workers"], "stages": stages["stages"], "bottleneck": stages["bottleneck"] });
        return Ok(format!("{out:#}\n"));
    }
    Ok(render_status(&workers, &stages))
}

fn render_status(workers: &Value, stages: &Value) -> String {
    let empty = Vec::new();
    let worker_list = workers["workers"].as_array().unwrap_or(&empty);
    let stage_list = stages["stages"].as_array().unwrap_or(&empty);
    let alive = worker_list
        .iter()
        .filter(|w| !matches!(w["status"].as_str(), Some("dead" | "stopped")))
        .count();
    let mut out = format!(
        "{} workers ({alive} alive), {} stages",
        worker_list.len(),
        stage_list.len()
    );
    if let Some(b) = stages["bottleneck"].as_object() {
        out.push_str(&format!(
            "; bottleneck: {} ({})",
            s(&b["stage"]),
            s(&b["reason"])
        ));
    }
    out.push_str("\n\n");

    let mut t = Table::new(&[
        "STAGE",
        "NEXT",
        ">READY",
        ">UNACKED",
        ">WORKERS",
        ">IN FLIGHT",
        ">IN/S",
        ">OUT/S",
        ">P50",
        ">P95",
        ">SUCCESS",
        ">DEAD",
    ]);
    for st in stage_list {
        let workers = &st["workers"];
        let mut name = s(&st["name"]);
        if st["bottleneck"].as_bool() == Some(true) {
            name.push_str(" *");
        }
        t.row(vec![
            name,
            s(&st["next"]),
            s(&st["queue"]["ready"]),
            s(&st["queue"]["unacked"]),
            format!("{}/{}", s(&workers["alive"]), s(&workers["total"])),
            s(&st["in_flight"]),
            format!("{:.1}", st["arrival_rate"].as_f64().unwrap_or(0.0)),
            format!("{:.1}", st["completion_rate"].as_f64().unwrap_or(0.0)),
            ms(&st["processing_ms"]["p50"]),
            ms(&st["processing_ms"]["p95"]),
            percent(st["success_rate"].as_f64()),
            s(&st["dead_lettered"]),
        ]);
    }
    if t.is_empty() {
        out.push_str("no stages yet\n");
    } else {
        out.push_str(&t.render());
    }
    out.push('\n');

    let mut t = Table::new(&[
        "WORKER",
        "STAGE",
        "STATUS",
        "CURRENT TASK",
        ">QUEUE",
        ">AVG",
        ">P95",
        ">LAST DONE",
        ">SUCCESS",
        ">TASKS/S",
        ">CPU",
        ">MEM",
    ]);
    for w in worker_list {
        let tasks = w["current_tasks"].as_array().unwrap_or(&empty);
        let current = match tasks.first() {
            None => "-".to_owned(),
            Some(task) => {
                let id = ellipsize(&s(&task["task_id"]), 24);
                if tasks.len() > 1 {
                    format!("{id} +{}", tasks.len() - 1)
                } else {
                    id
                }
            }
        };
        t.row(vec![
            s(&w["id"]),
            s(&w["stage"]),
            s(&w["status"]),
            current,
            s(&w["queue_size"]),
            ms(&w["avg_processing_ms"]),
            ms(&w["p95_processing_ms"]),
            w["last_completed_ago_ms"]
                .as_u64()
                .map_or("-".into(), |a| format!("{} ago", duration(a))),
            percent(w["success_rate"].as_f64()),
            format!("{:.1}", w["throughput_per_s"].as_f64().unwrap_or(0.0)),
            opt(w["cpu_ratio"]
                .as_f64()
                .map(|c| format!("{:.0}%", c * 100.0))),
            opt(w["memory_bytes"].as_u64().map(bytes)),
        ]);
    }
    if t.is_empty() {
        out.push_str("no workers yet\n");
    } else {
        out.push_str(&t.render());
    }
    out
}

/// `guildhall trace ID`: one task's pipeline.
pub async fn trace(args: &TraceArgs) -> Result<String, ClientError> {
    let id = guildhall_proto::TaskId::new(args.id.as_str()).map_err(|e| ClientError::Api {
        status: 400,
        message: e.to_string(),
    })?;
    let task = get(&args.client, &format!("/api/tasks/{id}")).await?;
    if args.client.json {
        return Ok(format!("{task:#}\n"));
    }
    Ok(render_trace(&task))
}

fn render_trace(task: &Value) -> String {
    let mut out = format!(
        "task {}: {} at {}",
        s(&task["id"]),
        s(&task["status"]),
        s(&task["stage"])
    );
    // Issue 18: a priority other than the default, and a due time.
    if let Some(p) = task["priority"].as_u64().filter(|&p| p > 0) {
        out.push_str(&format!(", priority {p}"));
    }
    if let Some(due) = task["due_at_ms"].as_u64() {
        out.push_str(&format!(", due {}", clock(due)));
    }
    if let Some(sub) = task["submitted_at_ms"].as_u64() {
        out.push_str(&format!(", submitted {}", clock(sub)));
    }
    if let Some(d) = task["duration_ms"].as_u64() {
        let verb = if task["finished_at_ms"].is_u64() {
            "took"
        } else {
            "running for"
        };
        out.push_str(&format!(", {verb} {}", duration(d)));
    }
    if let Some(eta) = task["eta_in_ms"].as_u64() {
        out.push_str(&format!(", done in ~{}", duration(eta)));
    }
    out.push_str("\n\n");
    let mut t = Table::new(&[
        ">#",
        "STAGE",
        ">ATTEMPT",
        "WORKER",
        "QUEUED",
        ">WAIT",
        "STARTED",
        ">DURATION",
        "OUTCOME",
        "ERROR",
    ]);
    let empty = Vec::new();
    for (i, a) in task["attempts"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let mut outcome = s(&a["outcome"]);
        if a["redelivered"].as_bool() == Some(true) {
            outcome.push_str(" (redelivered)");
        }
        if let Some(due) = a["due_at_ms"].as_u64() {
            outcome.push_str(&format!(" (due {})", clock(due)));
        }
        let error = match (a["error_class"].as_str(), a["error"].as_str()) {
            (Some(class), Some(err)) => ellipsize(&format!("[{class}] {err}"), 60),
            (None, Some(err)) => ellipsize(err, 60),
            _ => "-".into(),
        };
        t.row(vec![
            (i + 1).to_string(),
            s(&a["stage"]),
            s(&a["attempt"]),
            s(&a["worker"]),
            opt(a["queued_at_ms"].as_u64().map(clock)),
            ms(&a["wait_ms"]),
            opt(a["started_at_ms"].as_u64().map(clock)),
            ms(&a["duration_ms"]),
            outcome,
            error,
        ]);
    }
    out.push_str(&t.render());
    if task["flow"].is_object() {
        out.push('\n');
        out.push_str(&render_flow(&task["flow"]));
    }
    out
}

/// The flow section of a trace (issue 19): parent, children and their
/// join, what it runs after and what it waits for, why it failed.
fn render_flow(f: &Value) -> String {
    let mut out = format!("flow: root {}\n", s(&f["root"]));
    if let Some(parent) = f["parent"].as_str() {
        match f["index"].as_u64() {
            Some(i) => out.push_str(&format!("  parent: {parent} (child {i})\n")),
            None => out.push_str(&format!("  parent: {parent}\n")),
        }
    }
    if let Some(c) = f["children"].as_object() {
        let ended: Vec<String> = c
            .get("ended")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{} {k}", s(v)))
            .collect();
        let done: u64 = c
            .get("ended")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.as_u64())
            .sum();
        let join = match c.get("join").and_then(Value::as_str) {
            Some(j) => format!("join at {j}"),
            None => "no join stage".to_owned(),
        };
        out.push_str(&format!(
            "  children: {done} of {} ended{}; {join} (on child failure: {}): {}\n",
            s(&c["total"]),
            if ended.is_empty() {
                String::new()
            } else {
                format!(" ({})", ended.join(", "))
            },
            c.get("on_child_failure").map_or("-".into(), s),
            c.get("state").map_or("-".into(), s),
        ));
    }
    if let Some(after) = f["after"].as_array().filter(|a| !a.is_empty()) {
        let deps: Vec<String> = after
            .iter()
            .map(|d| {
                let waiting = if d["waiting"].as_bool() == Some(true) {
                    ", waiting"
                } else {
                    ""
                };
                format!("{} ({}{waiting})", s(&d["id"]), s(&d["status"]))
            })
            .collect();
        out.push_str(&format!(
            "  after: {} (on dependency failure: {})\n",
            deps.join(", "),
            s(&f["on_dependency_failure"])
        ));
    }
    if let Some(w) = f["waiting_for"].as_array().filter(|w| !w.is_empty()) {
        let w: Vec<String> = w.iter().map(s).collect();
        out.push_str(&format!("  waiting for: {}\n", w.join(", ")));
    }
    if let Some(d) = f["dependents"].as_array().filter(|d| !d.is_empty()) {
        let d: Vec<String> = d.iter().map(s).collect();
        out.push_str(&format!("  dependents: {}\n", d.join(", ")));
    }
    if let Some(why) = f["failed_because"].as_str() {
        out.push_str(&format!("  failed because: {why}\n"));
    }
    if let Some(r) = f["release"].as_object() {
        out.push_str(&format!(
            "  release to {}: retrying since {} ({} tries): {}\n",
            r.get("stage").map_or("-".into(), s),
            r.get("since_ms")
                .and_then(Value::as_u64)
                .map_or("-".into(), clock),
            r.get("attempts").map_or("-".into(), s),
            r.get("error").map_or("-".into(), s),
        ));
    }
    out
}

/// `guildhall worker ...`: one control command through the API.
pub async fn worker(args: &super::WorkerArgs) -> Result<String, ClientError> {
    use super::WorkerAction as A;
    let post = reqwest::Method::POST;
    let (target, method, action, body) = match &args.action {
        A::Pause(t) => (t, post, "pause", None),
        A::Resume(t) => (t, post, "resume", None),
        A::Drain(t) => (t, post, "drain", None),
        A::Restart(t) => (t, post, "restart", None),
        A::Concurrency(c) => (
            &c.target,
            post,
            "concurrency",
            Some(json!({ "concurrency": c.concurrency })),
        ),
        A::Logs(l) => (&l.target, reqwest::Method::GET, "logs", None),
    };
    let mut path = format!("/api/workers/{}/{action}", encode_segment(&target.id));
    if let A::Logs(l) = &args.action {
        path.push_str(&format!("?lines={}", l.lines));
    }
    let answer = request(&target.client, method, &path, body).await?;
    if target.client.json {
        return Ok(format!("{answer:#}\n"));
    }
    if let A::Logs(_) = &args.action {
        let mut out = String::new();
        for line in answer["lines"].as_array().into_iter().flatten() {
            out.push_str(line.as_str().unwrap_or_default());
            out.push('\n');
        }
        return Ok(out);
    }
    Ok(format!("{}: {}\n", target.id, s(&answer["message"])))
}

/// `id` safe in a URL path (ids are `A-Z a-z 0-9 _ - . : @`; anything else
/// is escaped, and the coordinator answers 400 for it).
pub(super) fn encode_segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b':' | b'@' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_stages_and_workers() {
        let workers = json!({"workers": [{
            "id": "w1", "stage": "build", "status": "processing",
            "current_tasks": [{"task_id": "T1"}, {"task_id": "T2"}],
            "queue_size": 3, "avg_processing_ms": 120.0, "p95_processing_ms": 300,
            "last_completed_ago_ms": 400, "success_rate": 0.5, "throughput_per_s": 2.0,
            "cpu_ratio": 0.25, "memory_bytes": 1048576
        }]});
        let stages = json!({"stages": [{
            "name": "build", "next": null, "queue": {"ready": 3, "unacked": 2},
            "workers": {"alive": 1, "total": 1}, "in_flight": 2, "arrival_rate": 2.0,
            "completion_rate": 1.5, "processing_ms": {"p50": 100, "p95": 300},
            "success_rate": 1.0, "dead_lettered": 0, "bottleneck": true
        }], "bottleneck": {"stage": "build", "reason": "highest utilisation"}});
        let text = render_status(&workers, &stages);
        assert!(
            text.contains("bottleneck: build (highest utilisation)"),
            "{text}"
        );
        assert!(text.contains("build *"), "{text}");
        assert!(text.contains("T1 +1"), "{text}");
        assert!(text.contains("1.0 MiB"), "{text}");
        assert!(text.contains("400 ms ago"), "{text}");
    }

    #[test]
    fn trace_renders_one_row_per_attempt() {
        let task = json!({"id": "T1", "status": "succeeded", "stage": "b", "submitted_at_ms": 0,
            "finished_at_ms": 1800, "duration_ms": 1800, "attempts": [
            {"stage": "a", "attempt": 1, "worker": "w1", "queued_at_ms": 0, "wait_ms": 100,
             "started_at_ms": 100, "duration_ms": 200, "outcome": "retried", "error": "boom", "error_class": "http_503"},
            {"stage": "a", "attempt": 2, "worker": "w2", "outcome": "succeeded", "redelivered": true}
        ]});
        let text = render_trace(&task);
        assert!(
            text.starts_with("task T1: succeeded at b, submitted 00:00:00.000Z, took 1.8 s"),
            "{text}"
        );
        assert!(text.contains("[http_503] boom"), "{text}");
        assert!(text.contains("succeeded (redelivered)"), "{text}");
        assert_eq!(text.lines().count(), 5, "{text}");
    }

    #[test]
    fn trace_shows_the_flow_section() {
        let task = json!({"id": "D", "status": "held", "stage": "deploy", "attempts": [],
            "flow": {"root": "A", "parent": null, "index": null, "children": null,
                "after": [{"id": "A", "status": "succeeded", "waiting": false},
                          {"id": "B", "status": "running", "waiting": true}],
                "on_dependency_failure": "fail", "waiting_for": ["dependency B"],
                "dependents": ["E"], "failed_because": null,
                "release": {"stage": "deploy", "since_ms": 1000, "attempts": 3,
                    "error": "no queue for stage deploy"}}});
        let text = render_trace(&task);
        assert!(text.contains("flow: root A\n"), "{text}");
        assert!(
            text.contains(
                "  after: A (succeeded), B (running, waiting) (on dependency failure: fail)\n"
            ),
            "{text}"
        );
        assert!(text.contains("  waiting for: dependency B\n"), "{text}");
        assert!(text.contains("  dependents: E\n"), "{text}");
        assert!(
            text.contains("  release to deploy: retrying since 00:00:01.000Z (3 tries): no queue"),
            "{text}"
        );
        assert!(!text.contains("children"), "{text}");
        let task = json!({"id": "P", "status": "waiting", "stage": "split", "attempts": [],
            "flow": {"root": "R", "parent": "R", "index": 2,
                "children": {"total": 5, "ended": {"succeeded": 2, "dead_lettered": 1},
                    "join": "merge", "on_child_failure": "continue", "state": "waiting"},
                "after": [], "waiting_for": ["2 of 5 children"], "dependents": [],
                "failed_because": "child P:1 dead_lettered: boom"}});
        let text = render_trace(&task);
        assert!(text.contains("  parent: R (child 2)\n"), "{text}");
        assert!(
            text.contains("  children: 3 of 5 ended (1 dead_lettered, 2 succeeded); join at merge (on child failure: continue): waiting\n"),
            "{text}"
        );
        assert!(
            text.contains("  failed because: child P:1 dead_lettered: boom\n"),
            "{text}"
        );
        // No flow: no section.
        let plain =
            json!({"id": "T", "status": "queued", "stage": "a", "attempts": [], "flow": null});
        assert!(!render_trace(&plain).contains("flow:"));
    }

    #[test]
    fn trace_shows_a_scheduled_task_its_priority_and_due_time() {
        let task = json!({"id": "T2", "status": "scheduled", "stage": "a", "priority": 8,
            "due_at_ms": 3_600_000, "attempts": [
            {"stage": "a", "attempt": 1, "queued_at_ms": 0, "outcome": "scheduled", "due_at_ms": 3_600_000}
        ]});
        let text = render_trace(&task);
        assert!(
            text.starts_with("task T2: scheduled at a, priority 8, due 01:00:00.000Z"),
            "{text}"
        );
        assert!(text.contains("scheduled (due 01:00:00.000Z)"), "{text}");
    }
}
