//! `guildhall-bench rate-limit`: a stage's achieved start rate against its
//! limit, with 1, 3 and 10 real agent processes (the built-in simulated
//! worker, 2 ms a task, so the limit and not the work bounds the rate), and
//! with 3 agents while a fourth joins and one leaves inside the window.
//!
//! Each scenario runs in a namespace of its own: a backlog on the stage, a
//! `guildhall serve --rate-limit`, the agents (each with `--rate-limit 1/s`
//! until its share arrives), a warm-up until the split covers every agent,
//! then the coordinator's `guildhall_tasks_started_total{stage}` read at
//! the start and end of the window. Repeated `--runs` times: the median and
//! range per scenario.

use crate::probe::{ChildCoordinator, sibling_bin};
use crate::{BenchTarget, Target};
use anyhow::{Context, anyhow};
use clap::Args;
use guildhall_broker::task::TaskMeta;
use guildhall_broker::{Publisher, now_ms};
use guildhall_proto::{Names, Rate, Stage, TaskId};
use serde::Serialize;
use std::time::Duration;
use tokio::process::{Child, Command};

/// `guildhall-bench rate-limit`.
#[derive(Debug, Clone, Args)]
pub struct RateArgs {
    /// Broker, namespace prefix, `--json`, `--quick`, `--management-url`.
    #[command(flatten)]
    pub target: BenchTarget,
    /// The stage's limit.
    #[arg(long, default_value = "50/s")]
    pub limit: String,
    /// Measured window per run (default 20 s; --quick 5 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub window: Option<Duration>,
    /// Runs per scenario (default 3; --quick 1).
    #[arg(long)]
    pub runs: Option<usize>,
}

/// One scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// What ran.
    pub scenario: String,
    /// Achieved starts per second of each run.
    pub rates: Vec<f64>,
    /// Their median.
    pub median: f64,
    /// The median over the limit.
    pub ratio: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct RateReport {
    /// The limit, tasks/s.
    pub limit_per_second: f64,
    /// The window, seconds.
    pub window_s: f64,
    /// Per scenario.
    pub scenarios: Vec<ScenarioReport>,
}

const STAGE: &str = "limited";

/// Runs every scenario.
pub async fn run(args: &RateArgs) -> anyhow::Result<RateReport> {
    let target = args.target.resolve()?;
    let limit: Rate = args
        .limit
        .parse()
        .map_err(|e| guildhall::config::ConfigError(format!("--limit: {e}")))?;
    let quick = args.target.common.quick;
    let window = args
        .window
        .unwrap_or(Duration::from_secs(if quick { 5 } else { 20 }));
    let runs = args.runs.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let mut scenarios = Vec::new();
    for (name, agents, churn) in [
        ("1 agent", 1, false),
        ("3 agents", 3, false),
        ("10 agents", 10, false),
        ("3 agents, one joins, one leaves", 3, true),
    ] {
        let mut rates = Vec::new();
        for _ in 0..runs {
            rates.push(scenario(&target, limit, window, agents, churn).await?);
        }
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        scenarios.push(ScenarioReport {
            scenario: name.into(),
            rates,
            median,
            ratio: median / limit.per_sec(),
        });
    }
    Ok(RateReport {
        limit_per_second: limit.per_sec(),
        window_s: window.as_secs_f64(),
        scenarios,
    })
}

/// One run: the achieved start rate over the window.
async fn scenario(
    target: &Target,
    limit: Rate,
    window: Duration,
    agents: usize,
    churn: bool,
) -> anyhow::Result<f64> {
    let (names, conn) = target.open().await?;
    let stage: Stage = STAGE.parse()?;
    guildhall_broker::topology::declare_stage(&conn, &names, &stage).await?;
    let publisher = Publisher::open(&conn).await?;
    let backlog = (limit.per_sec() * (window.as_secs_f64() + 20.0) * 1.3) as u64 + 100;
    for i in 0..backlog {
        let meta = TaskMeta::submission(TaskId::new(format!("t{i}"))?, now_ms(), None);
        publisher
            .publish(&names.tasks_exchange(), STAGE, b"x", meta.properties())
            .await?;
    }
    let coordinator = ChildCoordinator::spawn(
        &target.raw_url,
        &names,
        &["--rate-limit".into(), format!("{STAGE}={limit}")],
    )
    .await?;
    let result = async {
        let agent_bin = sibling_bin("guildhall-agent")?;
        let mut procs = Vec::new();
        for i in 0..agents {
            procs.push(spawn_agent(&agent_bin, target, &names, i)?);
        }
        wait_split(&coordinator, agents).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = started(&coordinator).await?;
        let t0 = std::time::Instant::now();
        if churn {
            tokio::time::sleep(window / 4).await;
            procs.push(spawn_agent(&agent_bin, target, &names, agents)?);
            tokio::time::sleep(window / 4).await;
            if let Some(first) = procs.first()
                && let Some(pid) = first.id().and_then(|p| i32::try_from(p).ok())
            {
                // SAFETY: kill(2) on a child we started and have not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        tokio::time::sleep(window.saturating_sub(t0.elapsed())).await;
        let after = started(&coordinator).await?;
        let rate = (after - before) / t0.elapsed().as_secs_f64();
        for mut p in procs {
            let _ = p.kill().await;
        }
        Ok::<f64, anyhow::Error>(rate)
    }
    .await;
    coordinator.stop().await;
    crate::clean_up(&conn, &names, &[&stage]).await;
    let _ = conn.close(200, "benchmark over".into()).await;
    result
}

fn spawn_agent(
    bin: &std::path::Path,
    target: &Target,
    names: &Names,
    i: usize,
) -> anyhow::Result<Child> {
    Command::new(bin)
        .args(["--amqp-url", &target.raw_url])
        .args(["--namespace", names.namespace().as_str()])
        .args(["--stage", STAGE, "--id", &format!("rate-{i}")])
        .args(["--simulate", "median=2ms,spread=0", "--concurrency", "4"])
        .args(["--rate-limit", "1/s", "--heartbeat", "500ms"])
        .env("RUST_LOG", "warn")
        .env_remove("GUILDHALL_NAMESPACE")
        .env_remove("AMQP_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

/// Waits until the coordinator split the limit among `agents` agents.
async fn wait_split(c: &ChildCoordinator, agents: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body: Option<serde_json::Value> =
            match reqwest::get(format!("{}/api/stages", c.base)).await {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
        let shares = body
            .and_then(|v| {
                v["stages"].as_array().and_then(|s| {
                    s.iter()
                        .find(|s| s["name"] == STAGE)
                        .and_then(|s| s["rate_limit"]["shares"].as_array().map(Vec::len))
                })
            })
            .unwrap_or(0);
        if shares == agents {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(anyhow!(
                "the limit was not split among {agents} agents within 60 s ({shares}): {}",
                c.last_words()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `guildhall_tasks_started_total{stage}` now.
async fn started(c: &ChildCoordinator) -> anyhow::Result<f64> {
    let text = c.metrics().await?;
    let key = format!("guildhall_tasks_started_total{{stage=\"{STAGE}\"}}");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// The report as a table.
pub fn table(r: &RateReport) -> String {
    let mut out = format!(
        "rate limit {}/s, window {} s\n{:<36} {:>10} {:>8}  runs\n",
        r.limit_per_second, r.window_s, "scenario", "median/s", "ratio"
    );
    for s in &r.scenarios {
        let runs: Vec<String> = s.rates.iter().map(|r| format!("{r:.2}")).collect();
        out.push_str(&format!(
            "{:<36} {:>10.2} {:>8.3}  {}\n",
            s.scenario,
            s.median,
            s.ratio,
            runs.join(" ")
        ));
    }
    out
}
