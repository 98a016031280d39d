//! `guildhall-bench`: how fast the coordinator ingests, how large a fleet it
//! tracks, how much memory a task costs, what the agent adds to a stage and
//! how many tasks/s a whole pipeline moves, measured on the real broker. Its
//! own binary, so the shipped `guildhall` carries none of it.
//!
//! Every benchmark prints a readable table, or JSON with `--json`, and has a
//! `--quick` variant for tests and smoke runs. None asserts a timing: the
//! figures go to `BENCHMARKS.md`.
//!
//! # Layout
//!
//! - this file: the flags, their validation and the shared report shape;
//! - `main.rs`: the `guildhall-bench` binary (logging, runtime, exit status);
//! - [`mix`]: simulated agents and the realistic event mix they send
//!   (pure, shared with the criterion benchmarks);
//! - [`ingest`]: `bench ingest`, events/s applied by a real coordinator
//!   process against a bare lapin consumer of the same messages;
//! - [`fleet`]: `bench fleet`, 1,000 or 10,000 heartbeating agents: CPU,
//!   memory, scrape and API times;
//! - [`memory`]: `bench memory`, bytes per completed and per in-flight task;
//! - [`overhead`]: `bench agent`, what the agent adds to a task's stage
//!   against a bare lapin consumer doing the same hand-off;
//! - [`pipeline`]: `bench pipeline`, tasks/s through N stages of real
//!   agent processes and HTTP workers, per-stage latencies, and a model of
//!   the task path timed step by step;
//! - [`flows`]: `bench flows`, memory per held dependent task and the
//!   release latency of the coordinator (issue 19), and
//!   [`fanout`]: its other part, a fan-out of N children joined back
//!   against the same N tasks submitted independently;
//! - [`probe`]: what the benchmarks read off a running coordinator: CPU and
//!   peak memory from `/proc`, counters and histograms from `/metrics`; and
//!   where the sibling binaries (`guildhall`, `guildhall-agent`) are.

pub mod fanout;
pub mod fleet;
pub mod flows;
pub mod ingest;
pub mod memory;
pub mod mix;
pub mod overhead;
pub mod pipeline;
pub mod priority;
pub mod probe;
pub mod rate;

use clap::{Args, Parser, Subcommand};
use guildhall::config::{BrokerArgs, ConfigError};
use guildhall_proto::{Names, Stage};
use serde::Serialize;
use std::time::Duration;

/// `guildhall-bench ...`: Guildhall's benchmarks on the real broker.
#[derive(Debug, Clone, Parser)]
#[command(name = "guildhall-bench", version, about, propagate_version = true)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub which: Which,
}

/// The benchmarks.
#[derive(Debug, Clone, Subcommand)]
pub enum Which {
    /// Events/s a coordinator applies from the events stream, with lag, CPU
    /// and memory, and the same messages' rate through a bare lapin consumer.
    Ingest(IngestArgs),
    /// A coordinator tracking 1,000 and 10,000 agents heartbeating every
    /// second with tasks flowing: CPU, memory, /metrics and /api/workers times.
    Fleet(FleetArgs),
    /// Bytes per tracked completed task and per in-flight task.
    Memory(MemoryArgs),
    /// What the agent adds to a task's stage (latency, throughput, CPU)
    /// against a bare lapin consumer doing the same hand-off.
    Agent(AgentArgs),
    /// Tasks/s end to end through N stages of real agents (one process per
    /// stage) and no-op HTTP workers, per-stage latency p50/p99, and with
    /// --profile where a task's time goes.
    Pipeline(PipelineArgs),
    /// Priorities and delays on one stage of a real agent: the wait of a
    /// trickle of priority-9 tasks behind a backlog against an idle stage,
    /// the backlog's drain, tasks/s through the intake against straight to
    /// a band, and how late delays fire.
    Priority(priority::PriorityArgs),
    /// Flows (issue 19): memory per held dependent task, release latency
    /// (dependency completed to dependent delivered) and a burst of
    /// releases, with a real coordinator; and a fan-out of N children
    /// joined back through real agents, against the same N tasks
    /// submitted independently: time and memory.
    Flows(flows::FlowsArgs),
    /// A stage's achieved start rate against its rate limit with 1, 3 and
    /// 10 agents and while agents join and leave.
    RateLimit(rate::RateArgs),
}

/// Where the broker's version is read (the reports name it).
#[derive(Debug, Clone, Args)]
pub struct VersionArgs {
    /// RabbitMQ management API, to name the broker's version in the
    /// report; "" to go without.
    #[arg(long, env = "GUILDHALL_MANAGEMENT_URL", default_value = guildhall::config::DEFAULT_MANAGEMENT_URL, hide_env_values = true)]
    pub management_url: String,
    /// PEM CA certificates to trust, besides the system's, for an https://
    /// --management-url [default: --amqp-ca-file].
    #[arg(long, env = "GUILDHALL_MANAGEMENT_CA_FILE", value_parser = guildhall::config::any_path)]
    pub management_ca_file: Option<std::path::PathBuf>,
}

impl VersionArgs {
    /// The broker's version, or why it is unknown.
    pub async fn broker_version(&self, url: &guildhall_broker::AmqpUrls) -> String {
        if self.management_url.trim().is_empty() {
            return "RabbitMQ (version unknown: no --management-url)".into();
        }
        let ca = match guildhall::config::management_ca(
            &self.management_url,
            self.management_ca_file.as_deref(),
            url,
        ) {
            Ok(ca) => ca,
            Err(e) => return format!("RabbitMQ (version unknown: {e})"),
        };
        match guildhall_broker::Management::with_ca(&self.management_url, url.vhost(), ca.as_ref())
        {
            Ok(m) => m
                .broker_version()
                .await
                .unwrap_or_else(|e| format!("RabbitMQ (version unknown: {e})")),
            Err(e) => format!("RabbitMQ (version unknown: {e})"),
        }
    }
}

/// Flags every benchmark takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A short run (smaller sizes and durations), for tests and smoke checks.
    #[arg(long)]
    pub quick: bool,
}

/// What every benchmark on the broker takes: the broker and namespace
/// prefix, `--json`/`--quick`, and where the broker's version is read.
#[derive(Debug, Clone, Args)]
pub struct BenchTarget {
    /// Broker and namespace prefix (a random namespace is made under it).
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// `--json`, `--quick`.
    #[command(flatten)]
    pub common: CommonArgs,
    /// `--management-url`.
    #[command(flatten)]
    pub version: VersionArgs,
}

/// A validated [`BenchTarget`].
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The broker's first address: the benchmarks' own load connections
    /// all go there, so a run measures one node.
    pub url: guildhall_broker::AmqpUrl,
    /// Every address given (set-up connections go to one that answers).
    pub urls: guildhall_broker::AmqpUrls,
    /// Every address as one comma-separated string, with TLS files from
    /// flags as query parameters (for a `guildhall serve` child or an agent).
    pub raw_url: String,
    /// Prefix of the benchmark's own namespaces.
    pub prefix: String,
}

impl Target {
    /// A fresh namespace under the prefix, and a connection (named after
    /// it) for setting it up and cleaning it away.
    pub(crate) async fn open(&self) -> anyhow::Result<(Names, lapin::Connection)> {
        use anyhow::Context;
        let names = bench_namespace(&self.prefix)?;
        let name = format!("guildhall-bench/{}", names.namespace());
        let (conn, _) = guildhall_broker::connect_any(&self.urls, &name, None)
            .await
            .context("cannot reach the broker")?;
        Ok((names, conn))
    }
}

impl BenchTarget {
    /// Validates the broker URL and namespace prefix.
    pub(crate) fn resolve(&self) -> Result<Target, ConfigError> {
        let (url, names) = self.broker.validate()?;
        guildhall::config::management_ca(
            &self.version.management_url,
            self.version.management_ca_file.as_deref(),
            &url,
        )?;
        Ok(Target {
            raw_url: url.raw(),
            url: url.first().clone(),
            urls: url,
            prefix: names.namespace().to_string(),
        })
    }
}

/// `guildhall-bench ingest`.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Broker, namespace prefix, `--json`, `--quick`, `--management-url`.
    #[command(flatten)]
    pub target: BenchTarget,
    /// Simulated agents (spread evenly over three stages).
    #[arg(long, default_value_t = 30)]
    pub agents: usize,
    /// Broker connections the agents share (each agent has its own channel).
    #[arg(long, default_value_t = 3)]
    pub connections: usize,
    /// Most events in one envelope (an agent's batch).
    #[arg(long, default_value_t = 250)]
    pub batch: usize,
    /// Events the stream holds for the drain comparison (default 4,000,000; --quick 200,000).
    #[arg(long)]
    pub events: Option<u64>,
    /// Target publish rate of the live phase, events/s (default 200,000; --quick 50,000).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Length of the live phase (default 10s; --quick 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Longest wait for the coordinator to catch up after each phase.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Stream consumer prefetch of the coordinator and the bare consumer.
    #[arg(long, default_value_t = 2_000)]
    pub prefetch: u16,
    /// Times the whole stream is read, alternately by the bare consumer and
    /// by a fresh coordinator: the broker's own delivery rate varies from
    /// one read to the next, so the figures are medians (default 3;
    /// --quick 1).
    #[arg(long)]
    pub drain_rounds: Option<usize>,
}

/// `guildhall-bench fleet`.
#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// Broker, namespace prefix, `--json`, `--quick`, `--management-url`.
    #[command(flatten)]
    pub target: BenchTarget,
    /// Fleet sizes to run, one after the other (default 1000,10000; --quick 200).
    #[arg(long, value_delimiter = ',')]
    pub agents: Vec<usize>,
    /// Tasks per second flowing through the three-stage pipeline (each is
    /// about seven events).
    #[arg(long, default_value_t = 1_000)]
    pub task_rate: u64,
    /// Agents per broker connection.
    #[arg(long, default_value_t = 500)]
    pub agents_per_connection: usize,
    /// Measurement window, after a warm-up of three heartbeats (default 30s; --quick 3s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Export per-worker series (the slow case for /metrics).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub per_worker_metrics: bool,
}

/// `guildhall-bench memory`.
#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// `--json`, `--quick`.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Task counts to measure (default 100000,1000000; --quick 20000).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<u64>,
    /// Internal: measure one case in this process and print its JSON
    /// (`completed:N`, `inflight:N` or `limit:N`); the parent runs each case in a
    /// fresh process so one case's freed memory does not flatter the next.
    #[arg(long, hide = true)]
    pub case: Option<String>,
}

/// `guildhall-bench agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Broker, namespace prefix, `--json`, `--quick`, `--management-url`.
    #[command(flatten)]
    pub target: BenchTarget,
    /// Rounds; each runs both paths, in alternating order (default 3; --quick 1).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Tasks published at `--rate` per path and round, whose latency is
    /// measured (default 2,000; --quick 200).
    #[arg(long)]
    pub tasks: Option<u64>,
    /// Publish rate of the measured tasks, tasks/s.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Tasks put on the queue before each path starts, for its throughput
    /// (default 2,000; --quick 200).
    #[arg(long)]
    pub burst: Option<u64>,
    /// Prefetch and worker concurrency of both paths.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u32,
    /// Payload size, bytes (at least 8: the publish time).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Longest wait for a phase's tasks to arrive.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

/// `guildhall-bench pipeline`.
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// Broker, namespace prefix, `--json`, `--quick`, `--management-url`.
    #[command(flatten)]
    pub target: BenchTarget,
    /// Stages in the pipeline, one agent each.
    #[arg(long, default_value_t = 3)]
    pub stages: usize,
    /// Tasks published at once per run (default 2,000; --quick 200).
    #[arg(long)]
    pub tasks: Option<u64>,
    /// Each agent's concurrency, one series of runs per value (default 4,32; --quick 4).
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<u32>,
    /// Runs per concurrency (default 3; --quick 1).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// The no-op HTTP worker every stage posts to.
    #[arg(long, value_enum, default_value = "rust")]
    pub worker: pipeline::workers::WorkerKind,
    /// The Python interpreter, for the Python workers.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Payload size, bytes (at least 8: the publish time).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Longest wait for a run's tasks.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Also run a model of the agent's task path in this process, timed
    /// step by step (worker, next-stage confirm, events confirm, ack).
    #[arg(long)]
    pub profile: bool,
}

/// Runs a benchmark and renders its report.
pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    match &args.which {
        Which::Ingest(a) => {
            let report = ingest::run(a).await?;
            Ok(render(&report, a.target.common.json, ingest::table))
        }
        Which::Fleet(a) => {
            let report = fleet::run(a).await?;
            Ok(render(&report, a.target.common.json, fleet::table))
        }
        Which::Memory(a) => memory::run(a).await,
        Which::Agent(a) => {
            let report = overhead::run(a).await?;
            Ok(render(&report, a.target.common.json, overhead::table))
        }
        Which::Pipeline(a) => {
            let report = pipeline::run(a).await?;
            Ok(render(&report, a.target.common.json, pipeline::table))
        }
        Which::Priority(a) => {
            let report = priority::run(a).await?;
            Ok(render(&report, a.target.common.json, priority::table))
        }
        Which::Flows(a) => {
            let report = flows::run(a).await?;
            Ok(render(&report, a.target.common.json, flows::table))
        }
        Which::RateLimit(a) => {
            let report = rate::run(a).await?;
            Ok(render(&report, a.target.common.json, rate::table))
        }
    }
}

fn render<R: Serialize>(report: &R, json: bool, table: fn(&R) -> String) -> String {
    if json {
        match serde_json::to_string_pretty(report) {
            Ok(s) => s + "\n",
            Err(e) => format!("{{\"error\": \"cannot encode the report: {e}\"}}\n"),
        }
    } else {
        table(report)
    }
}

/// Checks `value` is within `lo..=hi`; the message names the flag.
pub(crate) fn in_range<T: PartialOrd + std::fmt::Display>(
    flag: &str,
    value: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if value < lo || value > hi {
        return Err(ConfigError(format!(
            "{flag} {value} is out of range ({lo} to {hi})"
        )));
    }
    Ok(value)
}

/// Checks `d` is within `lo_s..=hi_s` seconds; the message names the flag.
pub(crate) fn secs_in_range(
    flag: &str,
    d: Duration,
    lo_s: u64,
    hi_s: u64,
) -> Result<Duration, ConfigError> {
    if d < Duration::from_secs(lo_s) || d > Duration::from_secs(hi_s) {
        return Err(ConfigError(format!(
            "{flag} must be between {lo_s}s and {hi_s}s (got {})",
            humantime::format_duration(d)
        )));
    }
    Ok(d)
}

/// A plain-text table: a title, then aligned `label  value` lines.
pub(crate) fn lines(title: &str, rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = format!("{title}\n");
    for (label, value) in rows {
        out.push_str(&format!("  {label:<width$}  {value}\n"));
    }
    out
}

/// `12345678.9` as `12,345,679`.
pub(crate) fn thousands(x: f64) -> String {
    let n = x.round() as i128;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// The median of `v` (sorted in place; the upper one of an even count, 0
/// when empty).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A fresh namespace under `prefix`: `<prefix>-bench-<random>`.
pub(crate) fn bench_namespace(prefix: &str) -> Result<Names, ConfigError> {
    let ns = format!("{prefix}-bench-{:08x}", rand::random::<u32>());
    let ns = guildhall_proto::Namespace::new(ns)
        .map_err(|e| ConfigError(format!("--namespace: {e}")))?;
    Ok(Names::new(ns))
}

/// Deletes what a benchmark's namespace may hold: the events stream, the
/// stream of stored flow results (a `guildhall serve` child declares it),
/// the queues of `stages` (work and dead-letter) and the exchanges (tasks,
/// dead, control: a `guildhall serve` child or an agent declares the last).
/// A failure is logged, not fatal: the figures are already measured.
pub(crate) async fn clean_up(conn: &lapin::Connection, names: &Names, stages: &[&Stage]) {
    use guildhall_broker::topology::{delete_exchange, delete_queue};
    let mut queues = vec![names.events_stream(), names.results_stream()];
    for s in stages {
        queues.push(names.stage_queue(s));
        queues.push(names.dead_queue(s));
        for band in guildhall_proto::Band::ALL {
            queues.push(names.band_queue(s, band));
        }
    }
    let mut exchanges = vec![names.delay_deliver_exchange()];
    for level in 0..guildhall_proto::schedule::DELAY_LEVELS {
        queues.push(names.delay_level(level));
        exchanges.push(names.delay_level(level));
    }
    for q in queues {
        if let Err(e) = delete_queue(conn, &q).await {
            tracing::warn!("cannot delete the benchmark's queue {q}: {e}");
        }
    }
    exchanges.extend([
        names.tasks_exchange(),
        names.dead_exchange(),
        names.control_exchange(),
    ]);
    for x in exchanges {
        if let Err(e) = delete_exchange(conn, &x).await {
            tracing::warn!("cannot delete the benchmark's exchange {x}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-12_345.0), "-12,345");
    }

    #[test]
    fn ranges_name_the_flag() {
        assert!(in_range("--agents", 5, 1, 10).is_ok());
        let e = in_range("--agents", 0, 1, 10).unwrap_err();
        assert_eq!(e.to_string(), "--agents 0 is out of range (1 to 10)");
    }
}
