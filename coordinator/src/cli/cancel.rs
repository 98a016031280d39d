//! `guildhall cancel ID... | --stage S --status queued --prefix P
//! [--priority N] [--dry-run]`: cancels tasks through a running
//! coordinator (`DELETE /api/tasks/{id}`, `POST /api/tasks/cancel`).
//!
//! Bad input (a malformed id, an unknown id, a bad filter: the
//! coordinator's 400 and 404) is a one-line error with exit status 2; a task
//! that already finished is reported so and is not an error; anything else
//! (the coordinator unreachable, 401, 429, 503, 504) exit status 1.

use super::ClientArgs;
use super::client::{ClientError, encode_segment, request};
use crate::config::ConfigError;
use clap::Args;
use guildhall_proto::TaskId;
use serde_json::{Value, json};

/// `guildhall cancel`.
#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// API access.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The tasks to cancel (or a filter below).
    pub ids: Vec<String>,
    /// Filter: tasks at this stage.
    #[arg(long)]
    pub stage: Option<String>,
    /// Filter: tasks with this status (queued, running, retrying).
    #[arg(long)]
    pub status: Option<String>,
    /// Filter: tasks with this priority (0-9).
    #[arg(long)]
    pub priority: Option<u8>,
    /// Filter: tasks whose id starts with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Only count (and show a sample of) the tasks a filter matches.
    #[arg(long)]
    pub dry_run: bool,
    /// The name recorded as who cancelled.
    #[arg(long, default_value = "cli")]
    pub by: String,
}

fn bad(msg: impl Into<String>) -> anyhow::Error {
    ConfigError(msg.into()).into()
}

/// Runs `guildhall cancel`.
pub async fn run(args: &CancelArgs) -> anyhow::Result<String> {
    let has_filter = args.stage.is_some()
        || args.status.is_some()
        || args.priority.is_some()
        || args.prefix.is_some();
    match (args.ids.is_empty(), has_filter) {
        (true, false) => {
            return Err(bad(
                "give task ids, or a filter (--stage, --status, --priority, --prefix)",
            ));
        }
        (false, true) => {
            return Err(bad("give task ids or a filter, not both"));
        }
        _ => {}
    }
    if !args.ids.is_empty() {
        if args.dry_run {
            return Err(bad(
                "--dry-run goes with a filter (--stage, --status, --priority, --prefix)",
            ));
        }
        return by_id(args).await;
    }
    let body = json!({
        "stage": args.stage, "status": args.status, "priority": args.priority,
        "prefix": args.prefix, "dry_run": args.dry_run, "by": args.by,
    });
    let answer = request(
        &args.client,
        reqwest::Method::POST,
        "/api/tasks/cancel",
        Some(strip_nulls(body)),
    )
    .await
    .map_err(ClientError::into_command_error)?;
    if args.client.json {
        return Ok(format!("{answer:#}\n"));
    }
    Ok(render_bulk(&answer))
}

/// Cancels each id with `DELETE /api/tasks/{id}`.
async fn by_id(args: &CancelArgs) -> anyhow::Result<String> {
    for id in &args.ids {
        TaskId::new(id.as_str()).map_err(|e| bad(e.to_string()))?;
    }
    let mut out = String::new();
    let mut refused = Vec::new();
    let mut answers = Vec::new();
    for id in &args.ids {
        let path = format!(
            "/api/tasks/{}?by={}",
            encode_segment(id),
            encode_segment(&args.by)
        );
        match request(&args.client, reqwest::Method::DELETE, &path, None).await {
            Ok(a) => {
                out.push_str(&format!(
                    "{id}: cancel requested (was {})\n",
                    a["status"].as_str().unwrap_or("already requested")
                ));
                answers.push(a);
            }
            Err(ClientError::Api { status: 409, .. }) => {
                out.push_str(&format!("{id}: already finished\n"));
                answers.push(json!({"task_id": id, "result": "already_finished"}));
            }
            Err(e) if e.is_bad_input() => refused.push(format!("{id}: {e}")),
            Err(e) => return Err(e.into()),
        }
    }
    if args.client.json {
        out = format!("{:#}\n", Value::Array(answers));
    }
    if refused.is_empty() {
        Ok(out)
    } else {
        // What was cancelled is printed on stderr with the error line.
        eprint!("{out}");
        Err(bad(refused.join("; ")))
    }
}

fn strip_nulls(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    v
}

/// The answer of a bulk cancel, for a person.
fn render_bulk(a: &Value) -> String {
    let count = a["count"].as_u64().unwrap_or(0);
    let sample: Vec<String> = a["sample"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            v.as_str()
                .map(String::from)
                .or_else(|| v["task_id"].as_str().map(String::from))
                .unwrap_or_default()
        })
        .collect();
    let more = if (sample.len() as u64) < count {
        ", ..."
    } else {
        ""
    };
    if a["dry_run"].as_bool() == Some(true) {
        format!(
            "{count} task(s) match (dry run, nothing cancelled): {}{more}\n",
            sample.join(", ")
        )
    } else {
        format!(
            "{} of {count} matching task(s) cancelled: {}{more}\n",
            a["cancelled"].as_u64().unwrap_or(0),
            sample.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_answers_render_in_one_line() {
        let dry = json!({"dry_run": true, "count": 3, "sample": ["a", "b"]});
        assert_eq!(
            render_bulk(&dry),
            "3 task(s) match (dry run, nothing cancelled): a, b, ...\n"
        );
        let done = json!({"dry_run": false, "count": 1, "cancelled": 1,
            "sample": [{"task_id": "a", "result": "requested"}]});
        assert_eq!(render_bulk(&done), "1 of 1 matching task(s) cancelled: a\n");
    }
}
