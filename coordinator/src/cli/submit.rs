//! `guildhall submit`: publish tasks straight to the broker (no coordinator
//! needed): one task, `--count N` tasks back to back, or with `--rate R` a
//! Poisson stream (a load generator, as the compose demo's `loadgen` runs).

use super::{ConfigError, SubmitArgs};
use crate::submit::{Submitted, Submitter, When, parse_at, parse_delay, poisson_gap};
use guildhall_broker::{Publisher, connect, topology};
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

/// Runs `submit` until done or `stop` resolves; the output to print.
pub async fn run(args: &SubmitArgs, stop: impl Future<Output = ()>) -> anyhow::Result<String> {
    let (url, names) = args.broker.validate()?;
    let stage =
        Stage::new(args.stage.as_str()).map_err(|e| ConfigError(format!("--stage: {e}")))?;
    let id = args
        .id
        .as_deref()
        .map(TaskId::new)
        .transpose()
        .map_err(|e| ConfigError(format!("--id: {e}")))?;
    let plan = plan(args)?;
    let timing = timing(args, guildhall_broker::now_ms())?;
    let payload = read_payload(&args.payload)?;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let conn = connect(&url, &format!("guildhall-submit/{suffix}")).await?;
    let publisher = Publisher::open(&conn).await?;
    if args.declare {
        topology::declare_stage(publisher.channel(), &names, &stage).await?;
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
