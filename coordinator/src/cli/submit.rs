//! `guildhall submit`: publish tasks straight to the broker (no coordinator
//! needed): one task, `--count N` tasks back to back, or with `--rate R` a
//! Poisson stream (a load generator, as the compose demo's `loadgen` runs).
//!
//! With `--after ID` (issue 19, flows) the one task is held until those
//! tasks have finished: it goes through the coordinator's API (`POST
//! /api/tasks` with `after`), which holds it. Bad flags, a 400 or a 404 exit
//! with status 2 and one line; anything else (unreachable, 401, 409, 413,
//! 429, 503, 504) status 1.

use super::{ConfigError, SubmitArgs};
use crate::submit::{Submitted, Submitter, When, parse_at, parse_delay, poisson_gap};
use guildhall_broker::{Publisher, connect_any, topology};
use guildhall_proto::flow::{DependencyPolicy, after_list};
use guildhall_proto::{AgentId, Priority, Stage, TaskId};
use std::future::Future;
use std::io::Read;

/// Highest `--rate`, tasks per second: each task is confirmed before the
/// next goes out, which a local broker sustains at this rate.
const MAX_RATE: f64 = 1_000.0;

/// Highest `--count`.
const MAX_COUNT: u64 = 100_000_000;

/// How many tasks to submit, and how fast.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Plan {
    /// Tasks per second, or `None` for back to back.
    rate: Option<f64>,
    /// Tasks in all, or `None` until stopped.
    count: Option<u64>,
}

impl Plan {
    /// One task with the given (or a new) id: the plain `submit`.
    fn single(&self) -> bool {
        self.rate.is_none() && self.count.is_none_or(|n| n == 1)
    }
}

fn plan(args: &SubmitArgs) -> Result<Plan, ConfigError> {
    if let Some(rate) = args.rate
        && !(0.001..=MAX_RATE).contains(&rate)
    {
        return Err(ConfigError(format!(
            "--rate must be between 0.001 and {MAX_RATE} tasks/s (got {rate})"
        )));
    }
    if let Some(count) = args.count
        && !(1..=MAX_COUNT).contains(&count)
    {
        return Err(ConfigError(format!(
            "--count must be between 1 and {MAX_COUNT} (got {count})"
        )));
    }
    let plan = Plan {
        rate: args.rate,
        count: args.count,
    };
    if args.id.is_some() && !plan.single() {
        return Err(ConfigError(
            "--id names one task: it cannot be used with --rate or --count above 1".into(),
        ));
    }
    Ok(plan)
}

/// The priority and due time the flags ask for.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Timing {
    /// Every task's priority.
    priority: Priority,
    /// `--delay`: each task is due this long after it is submitted.
    delay_ms: Option<u64>,
    /// `--at`: every task is due then (ms since the epoch).
    at_ms: Option<u64>,
}

impl Timing {
    /// The priority and due time of a task submitted at `now_ms`.
    fn when(&self, now_ms: u64) -> When {
        When {
            priority: self.priority,
            due_at_ms: self
                .at_ms
                .or(self.delay_ms.map(|d| now_ms.saturating_add(d))),
        }
    }
}

/// The flags' [`Timing`] (`--at` read at `now_ms`).
fn timing(args: &SubmitArgs, now_ms: u64) -> Result<Timing, ConfigError> {
    let priority = match &args.priority {
        Some(p) => p
            .parse::<Priority>()
            .map_err(|e| ConfigError(format!("--priority: {e}")))?,
        None => Priority::DEFAULT,
    };
    let (delay_ms, at_ms) = match (&args.delay, &args.at) {
        (Some(_), Some(_)) => {
            return Err(ConfigError("give --delay or --at, not both".into()));
        }
        (Some(d), None) => (
            Some(parse_delay(d).map_err(|e| ConfigError(format!("--delay: {e}")))?),
            None,
        ),
        (None, Some(at)) => (
            None,
            Some(parse_at(at, now_ms).map_err(|e| ConfigError(format!("--at: {e}")))?),
        ),
        (None, None) => (None, None),
    };
    Ok(Timing {
        priority,
        delay_ms,
        at_ms,
    })
}

/// What `--after` and `--on-dependency-failure` ask for: `None` without
/// them, else the dependencies and the policy (checked here, so bad input
/// never reaches the coordinator).
fn hold(args: &SubmitArgs) -> Result<Option<(Vec<TaskId>, DependencyPolicy)>, ConfigError> {
    if args.after.is_empty() {
        if args.on_dependency_failure.is_some() {
            return Err(ConfigError(
                "--on-dependency-failure goes with --after".into(),
            ));
        }
        return Ok(None);
    }
    let after = after_list(args.after.iter().flat_map(|a| a.split(',')))
        .map_err(|e| ConfigError(format!("--after: {e}")))?;
    let policy = match &args.on_dependency_failure {
        None => DependencyPolicy::default(),
        Some(p) => DependencyPolicy::parse(p).ok_or_else(|| {
            let shown: String = p.chars().take(40).collect();
            ConfigError(format!(
                "--on-dependency-failure must be fail or run (got {shown:?})"
            ))
        })?,
    };
    if args.rate.is_some() || args.count.is_some_and(|n| n != 1) {
        return Err(ConfigError(
            "--after holds one task: it cannot be used with --rate or --count".into(),
        ));
    }
    if args.delay.is_some() || args.at.is_some() {
        return Err(ConfigError(
            "--after and --delay/--at together are not supported: a held task is published when its dependencies have finished".into(),
        ));
    }
    if args.declare {
        return Err(ConfigError(
            "--declare publishes straight to the broker; with --after the coordinator holds the task (declare the stage first)".into(),
        ));
    }
    Ok(Some((after, policy)))
}

/// The validated `--stage` and `--id`.
fn stage_and_id(args: &SubmitArgs) -> Result<(Stage, Option<TaskId>), ConfigError> {
    let stage =
        Stage::new(args.stage.as_str()).map_err(|e| ConfigError(format!("--stage: {e}")))?;
    let id = args
        .id
        .as_deref()
        .map(TaskId::new)
        .transpose()
        .map_err(|e| ConfigError(format!("--id: {e}")))?;
    Ok((stage, id))
}

/// Submits one task held until `after` have finished, through the API.
async fn held(
    args: &SubmitArgs,
    (after, policy): (Vec<TaskId>, DependencyPolicy),
) -> anyhow::Result<String> {
    let (stage, id) = stage_and_id(args)?;
    let priority = timing(args, guildhall_broker::now_ms())?.priority;
    let payload = read_payload(&args.payload)?;
    let mut body = serde_json::json!({
        "stage": stage.as_str(),
        "after": after.iter().map(TaskId::as_str).collect::<Vec<_>>(),
        "on_dependency_failure": policy.as_str(),
        "priority": priority.get(),
    });
    if let Some(id) = &id {
        body["id"] = id.as_str().into();
    }
    match String::from_utf8(payload) {
        Ok(text) => body["payload"] = text.into(),
        Err(e) => {
            use base64::Engine;
            body["payload_base64"] = base64::engine::general_purpose::STANDARD
                .encode(e.into_bytes())
                .into();
        }
    }
    let client = super::ClientArgs {
        broker: args.broker.clone(),
        api_url: args.api_url.clone(),
        json: args.json,
        api_token: args.api_token.clone(),
    };
    let answer = super::client::request(&client, reqwest::Method::POST, "/api/tasks", Some(body))
        .await
        .map_err(super::client::ClientError::into_command_error)?;
    if args.json {
        return Ok(format!(
            "{answer}
"
        ));
    }
    Ok(render_held(&answer))
}

/// A held submission's answer, for a person: the id, then what it waits for.
fn render_held(a: &serde_json::Value) -> String {
    let list = |v: &serde_json::Value| -> String {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let id = a["id"].as_str().unwrap_or("-");
    let stage = a["stage"].as_str().unwrap_or("-");
    let policy = a["on_dependency_failure"].as_str().unwrap_or("fail");
    let then = match a["status"].as_str() {
        Some("held") => format!(
            "held until: {} (then queued at {stage}; on dependency failure: {policy})",
            list(&a["waiting_for"])
        ),
        Some("dead_lettered") => format!(
            "dead-lettered at {stage}: {}",
            a["failed_because"]
                .as_str()
                .unwrap_or("a dependency failed")
        ),
        _ => format!(
            "not held: {} already finished; queued at {stage}",
            list(&a["after"])
        ),
    };
    format!(
        "{id}
{then}
"
    )
}

/// Runs `submit` until done or `stop` resolves; the output to print.
pub async fn run(args: &SubmitArgs, stop: impl Future<Output = ()>) -> anyhow::Result<String> {
    if let Some(hold) = hold(args)? {
        return held(args, hold).await;
    }
    let (url, names) = args.broker.validate()?;
    let (stage, id) = stage_and_id(args)?;
    let plan = plan(args)?;
    let timing = timing(args, guildhall_broker::now_ms())?;
    let payload = read_payload(&args.payload)?;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let (conn, _) = connect_any(&url, &format!("guildhall-submit/{suffix}"), None).await?;
    let publisher = Publisher::open(&conn).await?;
    if args.declare {
        topology::declare_stage(&conn, &names, &stage).await?;
    }
    let submitter = Submitter::new(AgentId::new(format!("submit-{suffix}"))?, names)
        .with_user_id(url.user_id());
    if plan.single() {
        let result = submitter
            .submit_when(
                Some(&conn),
                &publisher,
                stage,
                id,
                &payload,
                timing.when(guildhall_broker::now_ms()),
            )
            .await;
        let _ = conn.close(200, "done".into()).await;
        let Submitted { id, stage, .. } = result?;
        return Ok(if args.json {
            format!(
                "{}\n",
                serde_json::json!({ "id": id.as_str(), "stage": stage.as_str() })
            )
        } else {
            format!("{id}\n")
        });
    }
    let result = stream(
        &submitter,
        (&conn, &publisher),
        &stage,
        (&payload, timing),
        plan,
        stop,
    )
    .await;
    let _ = conn.close(200, "done".into()).await;
    // A failure ends the run with status 1 (a restart policy starts it
    // again); what was submitted before it is in the log line.
    let submitted = result?;
    Ok(if args.json {
        format!(
            "{}\n",
            serde_json::json!({ "submitted": submitted, "stage": stage.as_str() })
        )
    } else {
        format!("submitted {submitted} tasks to {stage}\n")
    })
}

/// Submits tasks by `plan` until the count is reached or `stop` resolves;
/// how many were submitted.
async fn stream(
    submitter: &Submitter,
    (conn, publisher): (&lapin::Connection, &Publisher),
    stage: &Stage,
    (payload, timing): (&[u8], Timing),
    plan: Plan,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<u64> {
    let mut stop = std::pin::pin!(stop);
    let mut submitted: u64 = 0;
    tracing::info!(%stage, rate = ?plan.rate, count = ?plan.count, "submitting");
    while plan.count.is_none_or(|n| submitted < n) {
        if let Some(rate) = plan.rate {
            tokio::select! {
                () = tokio::time::sleep(poisson_gap(rate)) => {}
                () = &mut stop => break,
            }
        }
        // Never cut short: once the task is published it is on the queue,
        // and a stop that dropped this future then would leave it uncounted
        // (one more task on the queue than the summary says). A stop waits
        // at most for this one confirm.
        // `--delay` counts from each task's own submit.
        let when = timing.when(guildhall_broker::now_ms());
        submitter
            .submit_when(Some(conn), publisher, stage.clone(), None, payload, when)
            .await
            .map_err(|e| anyhow::anyhow!("after {submitted} tasks: {e}"))?;
        submitted += 1;
        if submitted.is_multiple_of(1000) {
            tracing::info!(submitted, "submitting");
        }
    }
    Ok(submitted)
}

fn read_payload(arg: &str) -> anyhow::Result<Vec<u8>> {
    match arg.strip_prefix('@') {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            Ok(buf)
        }
        Some(path) => std::fs::read(path).map_err(|e| anyhow::anyhow!("--payload @{path}: {e}")),
        None => Ok(arg.as_bytes().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> SubmitArgs {
        let mut argv = vec!["guildhall", "submit", "--stage", "s"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::parse_from(argv).command {
            crate::cli::Command::Submit(args) => args,
            other => panic!("not submit: {other:?}"),
        }
    }

    #[test]
    fn one_task_unless_rate_or_count_says_otherwise() {
        assert!(plan(&args(&[])).unwrap().single());
        assert!(
            plan(&args(&["--count", "1", "--id", "t1"]))
                .unwrap()
                .single()
        );
        let p = plan(&args(&["--rate", "4"])).unwrap();
        assert_eq!((p.rate, p.count), (Some(4.0), None));
        assert!(!p.single());
        assert!(!plan(&args(&["--count", "5"])).unwrap().single());
    }

    #[test]
    fn a_delay_counts_from_each_task_s_submit_and_at_is_fixed() {
        let t = timing(
            &args(&["--rate", "1", "--count", "600", "--delay", "5m"]),
            1_000,
        )
        .expect("valid");
        assert_eq!(t.when(1_000).due_at_ms, Some(301_000));
        // The 600th task, ten minutes later, is due five minutes after it.
        assert_eq!(t.when(601_000).due_at_ms, Some(901_000));
        let at = "1970-01-01T00:01:00Z";
        let t = timing(&args(&["--count", "2", "--at", at]), 1_000).expect("valid");
        assert_eq!(t.when(1_000).due_at_ms, t.when(601_000).due_at_ms);
        assert_eq!(t.when(1_000).due_at_ms, Some(60_000));
        let t = timing(&args(&["--priority", "7"]), 1_000).expect("valid");
        assert_eq!(t.when(5_000).due_at_ms, None);
        assert_eq!(t.when(5_000).priority.get(), 7);
    }

    #[test]
    fn after_is_read_from_repeated_and_comma_separated_flags() {
        assert_eq!(hold(&args(&[])).unwrap(), None);
        let (after, policy) = hold(&args(&["--after", "A-1,B-2", "--after", "C-3"]))
            .unwrap()
            .unwrap();
        let ids: Vec<&str> = after.iter().map(TaskId::as_str).collect();
        assert_eq!(ids, ["A-1", "B-2", "C-3"]);
        assert_eq!(policy, DependencyPolicy::Fail);
        let (_, policy) = hold(&args(&["--after", "A", "--on-dependency-failure", "run"]))
            .unwrap()
            .unwrap();
        assert_eq!(policy, DependencyPolicy::Run);
        for (extra, expected) in [
            (
                &["--after", "bad id"][..],
                "--after: dependency invalid task id",
            ),
            (
                &["--after", "A,,B"],
                "--after: dependency invalid task id \"\"",
            ),
            (
                &["--on-dependency-failure", "run"],
                "--on-dependency-failure goes with --after",
            ),
            (
                &["--after", "A", "--on-dependency-failure", "maybe"],
                "--on-dependency-failure must be",
            ),
            (&["--after", "A", "--count", "2"], "--after holds one task"),
            (&["--after", "A", "--rate", "2"], "--after holds one task"),
            (
                &["--after", "A", "--delay", "5s"],
                "--after and --delay/--at",
            ),
            (
                &["--after", "A", "--declare"],
                "--declare publishes straight",
            ),
        ] {
            let err = hold(&args(extra)).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{extra:?}: {err}");
            assert!(!err.contains('\n'));
        }
        let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
        let err = hold(&args(&["--after", &many.join(",")])).unwrap_err();
        assert!(err.to_string().contains("more than 64"), "{err}");
    }

    #[test]
    fn a_held_answer_says_what_it_waits_for() {
        let a = serde_json::json!({"id": "D-1", "status": "held", "stage": "deploy",
            "after": ["A", "B"], "waiting_for": ["B"], "on_dependency_failure": "run"});
        assert_eq!(
            render_held(&a),
            "D-1\nheld until: B (then queued at deploy; on dependency failure: run)\n"
        );
        let a = serde_json::json!({"id": "D-2", "status": "queued", "stage": "deploy",
            "after": ["A"], "waiting_for": []});
        assert!(render_held(&a).contains("not held: A already finished"));
        let a = serde_json::json!({"id": "D-3", "status": "dead_lettered", "stage": "deploy",
            "failed_because": "dependency A dead_lettered at build"});
        assert!(
            render_held(&a)
                .ends_with("dead-lettered at deploy: dependency A dead_lettered at build\n")
        );
    }

    #[test]
    fn out_of_range_flags_are_one_line() {
        for (extra, expected) in [
            (
                &["--rate", "0"][..],
                "--rate must be between 0.001 and 1000",
            ),
            (&["--rate", "NaN"], "--rate must be between"),
            (&["--rate", "20000"], "--rate must be between"),
            (&["--count", "0"], "--count must be between 1 and 100000000"),
            (&["--count", "5", "--id", "t1"], "--id names one task"),
            (&["--rate", "2", "--id", "t1"], "--id names one task"),
        ] {
            let err = plan(&args(extra)).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{extra:?}: {err}");
            assert!(!err.contains('\n'));
        }
    }
}
