//! `guildhall cancel ID... | --stage S --status queued --prefix P
//! [--priority N] [--dry-run]`: cancels tasks through a running
//! coordinator (`DELETE /api/tasks/{id}`, `POST /api/tasks/cancel`).
//!
//! Bad input (a malformed id, an unknown id, a bad filter) is a one-line
//! error with exit status 2; a task that already finished is reported so
//! and is not an error.

use super::ClientArgs;
use super::client::{ClientError, encode_segment, request};
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

/// Why `guildhall cancel` failed.
#[derive(Debug, thiserror::Error)]
pub enum CancelCliError {
    /// Bad input: exit status 2.
    #[error("{0}")]
    Bad(String),
    /// The coordinator could not be reached, or failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// A client error, with the coordinator's 4xx answers as bad input.
fn classify(e: ClientError) -> CancelCliError {
    match e {
        ClientError::Api(m) if m.starts_with('4') => CancelCliError::Bad(m),
        e => CancelCliError::Client(e),
    }
}

/// Runs `guildhall cancel`.
pub async fn run(args: &CancelArgs) -> Result<String, CancelCliError> {
    let has_filter = args.stage.is_some()
        || args.status.is_some()
        || args.priority.is_some()
        || args.prefix.is_some();
    match (args.ids.is_empty(), has_filter) {
        (true, false) => {
            return Err(CancelCliError::Bad(
                "give task ids, or a filter (--stage, --status, --priority, --prefix)".into(),
            ));
        }
        (false, true) => {
            return Err(CancelCliError::Bad(
                "give task ids or a filter, not both".into(),
            ));
        }
        _ => {}
    }
    if !args.ids.is_empty() {
        if args.dry_run {
            return Err(CancelCliError::Bad(
                "--dry-run goes with a filter (--stage, --status, --priority, --prefix)".into(),
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
    .map_err(classify)?;
    if args.client.json {
        return Ok(format!("{answer:#}\n"));
    }
    Ok(render_bulk(&answer))
}

/// Cancels each id with `DELETE /api/tasks/{id}`.
async fn by_id(args: &CancelArgs) -> Result<String, CancelCliError> {
    for id in &args.ids {
        TaskId::new(id.as_str()).map_err(|e| CancelCliError::Bad(e.to_string()))?;
    }
    let mut out = String::new();
    let mut bad = Vec::new();
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
            Err(ClientError::Api(m)) if m.starts_with("409") => {
                out.push_str(&format!("{id}: already finished\n"));
                answers.push(json!({"task_id": id, "result": "already_finished"}));
            }
            Err(e) => match classify(e) {
                CancelCliError::Bad(m) => bad.push(format!("{id}: {m}")),
                other => return Err(other),
            },
        }
    }
    if args.client.json {
        out = format!("{:#}\n", Value::Array(answers));
    }
    if bad.is_empty() {
        Ok(out)
    } else {
        // What was cancelled is printed on stderr with the error line.
        eprint!("{out}");
        Err(CancelCliError::Bad(bad.join("; ")))
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
