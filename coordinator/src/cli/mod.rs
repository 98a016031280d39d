//! The `guildhall` command line: flags (each with an environment fallback),
//! their validation, and the client commands.
//!
//! # Layout
//!
//! - this file: the clap definitions and their conversion into runtime configs;
//! - [`client`]: `status` and `trace`, which read the coordinator's API;
//! - [`submit`]: `submit`, which publishes straight to the broker (one
//!   task, a count, or a Poisson stream with `--rate`);
//! - [`health`]: `healthcheck`, a container's HEALTHCHECK without curl;
//! - [`rate_limit`], [`scale`]: a stage's rate limit, scaling it by hand;
//! - [`render`]: terminal tables and time formatting.

mod band_targets;
pub mod cancel;
pub mod client;
pub mod health;
pub mod rate_limit;
pub mod render;
pub mod scale;
pub mod schedule;
pub mod submit;

use crate::capacity::CapacityConfig;
use crate::core::CoreConfig;
use crate::serve::ServeConfig;
use crate::serve::actuate::ActuatorConfig;
use clap::{Args, Parser, Subcommand};
use guildhall_broker::topology::StreamRetention;
use guildhall_proto::Stage;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

// The broker flags and the flag error live in [`crate::config`] (shared
// with the simulator and `guildhall-bench`); re-exported for the commands.
pub use crate::config::{
    BrokerArgs, ConfigError, DEFAULT_AMQP_URL, DEFAULT_MANAGEMENT_URL, any_path, management_ca,
};

/// Guildhall: watch and steer a fleet of workers processing tasks through
/// multi-stage pipelines on RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "guildhall", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator: consume the events stream, serve the API, metrics and health.
    Serve(ServeArgs),
    /// Run a self-contained demo: coordinator, a three-stage pipeline of simulated workers, and a feed of tasks.
    Demo(DemoArgs),
    /// Put a task on a stage's queue.
    Submit(SubmitArgs),
    /// Show workers and stages (from a running coordinator).
    Status(ClientArgs),
    /// Show one task's pipeline, stage by stage (from a running coordinator).
    Trace(TraceArgs),
    /// Simulate scaling policies on an arrival trace (no broker needed).
    Simulate(crate::sim::SimulateArgs),
    /// Control one worker through a running coordinator: pause, resume,
    /// drain, restart, concurrency, logs.
    Worker(WorkerArgs),
    /// Cron schedules through a running coordinator: add, list, remove,
    /// pause, resume.
    Schedule(schedule::ScheduleArgs),
    /// Cancel tasks through a running coordinator: by id, or by filter
    /// (--stage, --status, --priority, --prefix; --dry-run to count first).
    Cancel(cancel::CancelArgs),
    /// Set or lift a stage's rate limit (`50/s`, `30/min`, `off`) through a
    /// running coordinator.
    RateLimit(rate_limit::RateLimitArgs),
    /// Scale a stage by hand (`+1`, `-1`, or a count) through a running
    /// coordinator's actuator.
    Scale(scale::ScaleArgs),
    /// Exit 0 if a URL answers 2xx (default: the local coordinator's
    /// /healthz), else 1 with one line: a container healthcheck.
    Healthcheck(HealthcheckArgs),
    /// Moved to its own binary, `guildhall-bench`: prints where (hidden).
    #[command(hide = true, disable_help_flag = true)]
    Bench(MovedArgs),
}

/// Whatever follows a command that moved to another binary.
#[derive(Debug, Clone, Args)]
pub struct MovedArgs {
    /// Ignored.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// `guildhall worker ACTION ...`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: WorkerAction,
}

/// The worker commands.
#[derive(Debug, Clone, Subcommand)]
pub enum WorkerAction {
    /// Stop consuming; finish the tasks in hand.
    Pause(WorkerTarget),
    /// Consume again.
    Resume(WorkerTarget),
    /// Finish the tasks in hand, then exit.
    Drain(WorkerTarget),
    /// Restart the supervised worker process (its tasks go back to the queue).
    Restart(WorkerTarget),
    /// Process this many tasks at once (1 to 1024).
    Concurrency(ConcurrencyArgs),
    /// Print the last lines of the supervised worker process's output.
    Logs(LogsArgs),
}

/// A worker and the API to reach it through.
#[derive(Debug, Clone, Args)]
pub struct WorkerTarget {
    /// API access.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The worker's (agent's) id.
    pub id: String,
}

/// `guildhall worker concurrency ID N`.
#[derive(Debug, Clone, Args)]
pub struct ConcurrencyArgs {
    /// The worker.
    #[command(flatten)]
    pub target: WorkerTarget,
    /// Tasks at once.
    pub concurrency: u32,
}

/// `guildhall worker logs ID [--lines N]`.
#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// The worker.
    #[command(flatten)]
    pub target: WorkerTarget,
    /// How many lines at most.
    #[arg(long, default_value_t = 100)]
    pub lines: u32,
}

/// Flags of the coordinator (`serve` and `demo`).
#[derive(Debug, Clone, Args)]
pub struct CoordinatorArgs {
    /// Address the HTTP API, dashboard and metrics listen on.
    #[arg(long, env = "GUILDHALL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// RabbitMQ management API (for unacked counts); "" to go without.
    /// Several (one per cluster node) as a comma-separated list or by
    /// repeating the flag: calls go to the first that answers.
    #[arg(long, env = "GUILDHALL_MANAGEMENT_URL", default_value = DEFAULT_MANAGEMENT_URL, hide_env_values = true, action = clap::ArgAction::Append)]
    pub management_url: Vec<String>,
    /// PEM CA certificates to trust, besides the system's, for an https://
    /// --management-url [default: --amqp-ca-file].
    #[arg(long, env = "GUILDHALL_MANAGEMENT_CA_FILE", value_parser = any_path)]
    pub management_ca_file: Option<PathBuf>,
    /// Heartbeat intervals of silence after which a worker is suspect.
    #[arg(long, env = "GUILDHALL_SUSPECT_HEARTBEATS", default_value_t = 2)]
    pub suspect_heartbeats: u32,
    /// Heartbeat intervals of silence after which a worker is dead (its
    /// connection is then closed so the broker requeues its tasks).
    #[arg(long, env = "GUILDHALL_MISSED_HEARTBEATS", default_value_t = 3)]
    pub missed_heartbeats: u32,
    /// POST a JSON alert (Slack-compatible `text`) here when a worker dies or
    /// comes back and when a task is dead-lettered.
    #[arg(long, env = "GUILDHALL_ALERT_WEBHOOK", hide_env_values = true)]
    pub alert_webhook: Option<String>,
    /// Most finished tasks kept in memory.
    #[arg(long, env = "GUILDHALL_KEEP_COMPLETED", default_value_t = 100_000)]
    pub keep_completed: usize,
    /// Longest a finished task is kept in memory.
    #[arg(long, env = "GUILDHALL_KEEP_COMPLETED_FOR", default_value = "1h", value_parser = humantime::parse_duration)]
    pub keep_completed_for: Duration,
    /// How long dead or stopped workers stay listed.
    #[arg(long, env = "GUILDHALL_WORKER_RETENTION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub worker_retention: Duration,
    /// Export per-worker metric series (switch off for very large fleets).
    #[arg(long, env = "GUILDHALL_PER_WORKER_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub per_worker_metrics: bool,
    /// Events stream retention by age, if the coordinator creates the stream (RabbitMQ syntax: 7D, 12h).
    #[arg(long, env = "GUILDHALL_STREAM_MAX_AGE", default_value = "7D")]
    pub stream_max_age: String,
    /// Events stream retention by size in bytes, if the coordinator creates the stream.
    #[arg(
        long,
        env = "GUILDHALL_STREAM_MAX_BYTES",
        default_value_t = 2_000_000_000
    )]
    pub stream_max_bytes: u64,
    /// How often stage queue depths are polled.
    #[arg(long, env = "GUILDHALL_QUEUE_POLL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub queue_poll: Duration,
    /// Longest a task should wait in a stage queue (the sizing target).
    #[arg(long, env = "GUILDHALL_WAIT_TARGET", default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait_target: Duration,
    /// A stage's own wait target, as STAGE=DURATION (repeatable; or a
    /// comma-separated list in the environment).
    #[arg(
        long = "stage-wait-target",
        env = "GUILDHALL_STAGE_WAIT_TARGETS",
        value_delimiter = ','
    )]
    pub stage_wait_targets: Vec<String>,
    /// A priority band's own wait target, as BAND=DURATION with BAND one of
    /// 0-3, 4-6, 7-9 (repeatable; or a comma-separated list in the
    /// environment): a stage is sized for the strictest band with traffic.
    #[arg(
        long = "wait-target-band",
        env = "GUILDHALL_WAIT_TARGET_BANDS",
        value_delimiter = ','
    )]
    pub band_wait_targets: Vec<String>,
    /// Share of tasks allowed to wait longer than the target.
    #[arg(long, env = "GUILDHALL_WAIT_QUANTILE", default_value_t = 0.05)]
    pub wait_quantile: f64,
    /// Time a new worker takes to start: sizing looks this far ahead.
    #[arg(long, env = "GUILDHALL_LEAD_TIME", default_value = "60s", value_parser = humantime::parse_duration)]
    pub lead_time: Duration,
    /// Scale down only to the highest recommendation of this window.
    #[arg(long, env = "GUILDHALL_SCALE_DOWN_WINDOW", default_value = "300s", value_parser = humantime::parse_duration)]
    pub scale_down_window: Duration,
    /// Fewest workers recommended for a stage.
    #[arg(long, env = "GUILDHALL_MIN_WORKERS", default_value_t = 1)]
    pub min_workers: u32,
    /// Most workers recommended for a stage.
    #[arg(long, env = "GUILDHALL_MAX_WORKERS", default_value_t = 1000)]
    pub max_workers: u32,
    /// Width of the arrival-count buckets the forecast works on.
    #[arg(long, env = "GUILDHALL_FORECAST_BUCKET", default_value = "1m", value_parser = humantime::parse_duration)]
    pub forecast_bucket: Duration,
    /// Length of the forecast's season (a whole number of buckets).
    #[arg(long, env = "GUILDHALL_FORECAST_SEASON", default_value = "1day", value_parser = humantime::parse_duration)]
    pub forecast_season: Duration,
    /// How often stages are re-planned.
    #[arg(long, env = "GUILDHALL_SYNC_PERIOD", default_value = "15s", value_parser = humantime::parse_duration)]
    pub sync_period: Duration,
    /// POST each change of a stage's recommended workers here (JSON).
    #[arg(long, env = "GUILDHALL_SCALE_WEBHOOK", hide_env_values = true)]
    pub scale_webhook: Option<String>,
    /// Run this on each change, with {stage} and {workers} filled in (e.g.
    /// 'docker compose up -d --no-recreate --scale {stage}={workers}').
    #[arg(long, env = "GUILDHALL_SCALE_COMMAND")]
    pub scale_command: Option<String>,
    /// Only report scaling decisions and rebalancing moves; act on none.
    #[arg(long, env = "GUILDHALL_SCALE_DRY_RUN")]
    pub scale_dry_run: bool,
    /// Least time between two scaling actions on one stage.
    #[arg(long, env = "GUILDHALL_SCALE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub scale_interval: Duration,
    /// Move agents that can serve several stages (--stages) where they are needed.
    #[arg(long, env = "GUILDHALL_REBALANCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub rebalance: bool,
    /// Least time an agent stays on a stage after a move.
    #[arg(long, env = "GUILDHALL_MIN_DWELL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub min_dwell: Duration,
    /// Largest prefetch asked of an agent.
    #[arg(long, env = "GUILDHALL_PREFETCH_CAP", default_value_t = 256)]
    pub prefetch_cap: u32,
    /// Events stream messages delivered ahead of the coordinator's acks
    /// (credit), 1 to 65535: higher keeps a fast coordinator fed.
    #[arg(long, env = "GUILDHALL_STREAM_PREFETCH", default_value_t = 2_000)]
    pub stream_prefetch: u32,
    /// How long an agent has to confirm a command.
    #[arg(long, env = "GUILDHALL_COMMAND_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub command_timeout: Duration,
    /// Directory for snapshots of the state (`<namespace>.snapshot`), so a
    /// restart replays only the events stream's tail. Created if missing.
    /// Default (or ""): no snapshots; a restart replays the whole stream.
    #[arg(long, env = "GUILDHALL_DATA_DIR", value_parser = any_path)]
    pub data_dir: Option<PathBuf>,
    /// Time between two snapshots (with --data-dir), 1s to 1h.
    #[arg(long, env = "GUILDHALL_SNAPSHOT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub snapshot_interval: Duration,
    /// Distinct error classes tracked per stage; failures of further
    /// classes count as `other` (bounds memory and metric series).
    #[arg(long, env = "GUILDHALL_ERROR_CLASSES_PER_STAGE", default_value_t = 20)]
    pub error_classes_per_stage: usize,
    /// A stage's rate limit, STAGE=RATE (`resize=50/s`, `mail=30/min`),
    /// repeatable: the whole stage starts at most that many tasks per
    /// second, split among its live agents. Change it at run time with
    /// `guildhall rate-limit` or `PUT /api/stages/{stage}/rate-limit`.
    #[arg(long = "rate-limit", value_name = "STAGE=RATE")]
    pub rate_limit: Vec<String>,
    /// Require `Authorization: Bearer TOKEN` on every control endpoint
    /// (commands to workers, submitting, replaying dead letters).
    #[arg(long, env = "GUILDHALL_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Require the token on reads too (the API, events and /metrics;
    /// /healthz and the dashboard page stay open).
    #[arg(long, env = "GUILDHALL_PROTECT_READS")]
    pub protect_reads: bool,
    /// Host names the HTTP API answers besides IP addresses and localhost
    /// (against DNS rebinding): NAME, NAME:PORT or *.DOMAIN, repeated or
    /// comma-separated; `*` for any. Other names get 421.
    #[arg(
        long = "allowed-hosts",
        env = "GUILDHALL_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    /// Most HTTP connections open at once; at the limit an idle one is
    /// closed to admit a new one (fewer if the open-files limit is lower).
    #[arg(long, env = "GUILDHALL_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,
    /// Longest a client may take to send a complete request head (from
    /// its connection, or the first byte of a later request).
    #[arg(long, env = "GUILDHALL_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,
    /// Longest a kept-alive connection may wait for its next request, and
    /// a response may wait for its client to read.
    #[arg(long, env = "GUILDHALL_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,
    /// Longest a JSON request body may take to arrive (408 after).
    #[arg(long, env = "GUILDHALL_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_body_timeout: Duration,
    /// Most `GET /api/events` streams open at once (503 past it).
    #[arg(long, env = "GUILDHALL_HTTP_MAX_EVENT_STREAMS", default_value_t = 32)]
    pub http_max_event_streams: usize,
    /// Longest an API request waits on the broker: submitting a task,
    /// listing or replaying dead letters (504 after).
    #[arg(long, env = "GUILDHALL_BROKER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub broker_timeout: Duration,
    /// Strong mode: accept an events-stream message only if it carries
    /// RabbitMQ's validated `user_id` and that user is the envelope's
    /// sender (one broker user per agent, named as the agent id), or one
    /// of --trusted-users. Agents set `user_id` from their URL's user.
    #[arg(long, env = "GUILDHALL_REQUIRE_USER_ID")]
    pub require_user_id: bool,
    /// Broker users whose event messages are accepted under any sender id
    /// with --require-user-id (producers running `guildhall submit`; this
    /// coordinator's own user always is), comma-separated.
    #[arg(long, env = "GUILDHALL_TRUSTED_USERS", value_delimiter = ',')]
    pub trusted_users: Vec<String>,
}

/// Smallest `--api-token` accepted.
const MIN_TOKEN_LEN: usize = 16;

impl CoordinatorArgs {
    /// Who may read and control, from `--api-token` and `--protect-reads`.
    fn access(&self) -> Result<crate::http::access::Access, ConfigError> {
        let token = match self.api_token.as_deref() {
            None | Some("") => None,
            Some(t) if t.len() < MIN_TOKEN_LEN => {
                return Err(ConfigError(format!(
                    "--api-token must be at least {MIN_TOKEN_LEN} characters (got {}); try `openssl rand -hex 24`",
                    t.len()
                )));
            }
            Some(t) if !t.chars().all(|c| c.is_ascii_graphic()) => {
                return Err(ConfigError(
                    "--api-token must be printable ASCII without spaces".into(),
                ));
            }
            Some(t) => Some(t.to_owned()),
        };
        if self.protect_reads && token.is_none() {
            return Err(ConfigError("--protect-reads needs --api-token".into()));
        }
        Ok(crate::http::access::Access {
            token,
            protect_reads: self.protect_reads,
        })
    }

    /// Validates the flags into a [`ServeConfig`] and the listen address.
    pub fn validate(&self, broker: &BrokerArgs) -> Result<(ServeConfig, SocketAddr), ConfigError> {
        let (url, names) = broker.validate()?;
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            ConfigError(format!(
                "--listen must be an address like 127.0.0.1:8080 (got '{}')",
                self.listen
            ))
        })?;
        if !(1..=100).contains(&self.missed_heartbeats) {
            return Err(ConfigError(format!(
                "--missed-heartbeats must be between 1 and 100 (got {})",
                self.missed_heartbeats
            )));
        }
        if self.suspect_heartbeats == 0 || self.suspect_heartbeats >= self.missed_heartbeats {
            return Err(ConfigError(format!(
                "--suspect-heartbeats must be at least 1 and below --missed-heartbeats ({}) (got {})",
                self.missed_heartbeats, self.suspect_heartbeats
            )));
        }
        http_url("--alert-webhook", self.alert_webhook.as_deref())?;
        if self.queue_poll < Duration::from_millis(100)
            || self.queue_poll > Duration::from_secs(300)
        {
            return Err(ConfigError(format!(
                "--queue-poll must be between 100ms and 5m (got {})",
                humantime::format_duration(self.queue_poll)
            )));
        }
        if !valid_max_age(&self.stream_max_age) {
            return Err(ConfigError(format!(
                "--stream-max-age must be a number and a unit Y, M, D, h, m or s, like 7D (got '{}')",
                self.stream_max_age
            )));
        }
        if self.stream_max_bytes < 1_000_000 {
            return Err(ConfigError(format!(
                "--stream-max-bytes must be at least 1000000 (got {})",
                self.stream_max_bytes
            )));
        }
        if self.snapshot_interval < Duration::from_secs(1)
            || self.snapshot_interval > Duration::from_secs(3600)
        {
            return Err(ConfigError(format!(
                "--snapshot-interval must be between 1s and 1h (got {})",
                humantime::format_duration(self.snapshot_interval)
            )));
        }
        let data_dir = self.data_dir.clone().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = &data_dir {
            crate::serve::persist::prepare_dir(dir).map_err(|e| {
                ConfigError(format!(
                    "--data-dir: cannot write in {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let management_urls = self.management_url.join(",");
        let management_ca =
            management_ca(&management_urls, self.management_ca_file.as_deref(), &url)?;
        let management_url = if management_urls.split(',').all(|u| u.trim().is_empty()) {
            None
        } else {
            guildhall_broker::Management::with_ca(
                &management_urls,
                url.vhost(),
                management_ca.as_ref(),
            )
            .map_err(|e| ConfigError(format!("--management-url: {e}")))?;
            Some(management_urls)
        };
        let trusted: Vec<String> = self
            .trusted_users
            .iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if !trusted.is_empty() && !self.require_user_id {
            return Err(ConfigError(
                "--trusted-users needs --require-user-id".into(),
            ));
        }
        if let Some(bad) = trusted.iter().find(|u| u.len() > 255) {
            return Err(ConfigError(format!(
                "--trusted-users: a user name is at most 255 bytes (got {})",
                bad.len()
            )));
        }
        let own_user = url.user_id().map(str::to_owned);
        let mut config = ServeConfig::new(url, names);
        config.event_users = self
            .require_user_id
            .then(|| crate::serve::EventUsers::new(trusted.into_iter().chain(own_user).collect()));
        config.access = self.access()?;
        config.http = self.http()?;
        config.management_url = management_url;
        config.management_ca = management_ca;
        config.alert_webhook = self.alert_webhook.clone();
        let capacity = self.capacity()?;
        config.actuator = ActuatorConfig {
            webhook: http_url("--scale-webhook", self.scale_webhook.as_deref())?,
            command: match self.scale_command.as_deref().map(str::trim) {
                Some("") => return Err(ConfigError("--scale-command is empty".into())),
                other => other.map(str::to_owned),
            },
            dry_run: self.scale_dry_run,
            min_interval: self.scale_interval,
            namespace: String::new(),
        };
        for (flag, d, min, max) in [
            ("--sync-period", self.sync_period, 1, 3_600),
            ("--min-dwell", self.min_dwell, 0, 86_400),
            ("--command-timeout", self.command_timeout, 1, 600),
        ] {
            if d < Duration::from_secs(min) || d > Duration::from_secs(max) {
                return Err(ConfigError(format!(
                    "{flag} must be between {min}s and {max}s (got {})",
                    humantime::format_duration(d)
                )));
            }
        }
        if !(1..=1_000).contains(&self.error_classes_per_stage) {
            return Err(ConfigError(format!(
                "--error-classes-per-stage must be between 1 and 1000 (got {})",
                self.error_classes_per_stage
            )));
        }
        if !(1..=100_000).contains(&self.prefetch_cap) {
            return Err(ConfigError(format!(
                "--prefetch-cap must be between 1 and 100000 (got {})",
                self.prefetch_cap
            )));
        }
        config.prefetch = match u16::try_from(self.stream_prefetch) {
            Ok(p) if p >= 1 => p,
            _ => {
                return Err(ConfigError(format!(
                    "--stream-prefetch must be between 1 and 65535 (got {})",
                    self.stream_prefetch
                )));
            }
        };
        config.command_timeout = self.command_timeout;
        config.core = CoreConfig {
            capacity,
            sync_period_ms: duration_ms(self.sync_period),
            rebalance: self.rebalance,
            min_dwell_ms: duration_ms(self.min_dwell),
            prefetch_cap: self.prefetch_cap,
            suspect_heartbeats: self.suspect_heartbeats,
            missed_heartbeats: self.missed_heartbeats,
            completed_limit: self.keep_completed,
            completed_max_age_ms: duration_ms(self.keep_completed_for),
            worker_retention_ms: duration_ms(self.worker_retention),
            max_error_classes_per_stage: self.error_classes_per_stage,
            ..CoreConfig::default()
        };
        config.per_worker_metrics = self.per_worker_metrics;
        config.retention = StreamRetention {
            max_age: self.stream_max_age.clone(),
            max_bytes: self.stream_max_bytes,
        };
        config.queue_poll = self.queue_poll;
        config.data_dir = data_dir;
        config.snapshot_interval = self.snapshot_interval;
        config.rate_limits = self
            .rate_limit
            .iter()
            .map(|v| crate::serve::rate_limits::parse_flag(v).map_err(ConfigError))
            .collect::<Result<_, _>>()?;
        Ok((config, listen))
    }
}

impl CoordinatorArgs {
    /// The capacity settings, validated.
    fn capacity(&self) -> Result<CapacityConfig, ConfigError> {
        let mut stage_wait_targets = BTreeMap::new();
        for entry in self
            .stage_wait_targets
            .iter()
            .filter(|e| !e.trim().is_empty())
        {
            let (stage, d) = entry.split_once('=').ok_or_else(|| {
                ConfigError(format!(
                    "--stage-wait-target must be STAGE=DURATION, like build=10s (got '{entry}')"
                ))
            })?;
            let stage = Stage::new(stage.trim())
                .map_err(|e| ConfigError(format!("--stage-wait-target: {e}")))?;
            let d = humantime::parse_duration(d.trim()).map_err(|e| {
                ConfigError(format!(
                    "--stage-wait-target {stage}: {e} (got '{}')",
                    d.trim()
                ))
            })?;
            stage_wait_targets.insert(stage, duration_ms(d));
        }
        let band_wait_targets =
            band_targets::parse(&self.band_wait_targets).map_err(ConfigError)?;
        let bucket_ms = duration_ms(self.forecast_bucket);
        let season_ms = duration_ms(self.forecast_season);
        if bucket_ms == 0 || !season_ms.is_multiple_of(bucket_ms) {
            return Err(ConfigError(format!(
                "--forecast-season ({}) must be a whole number of --forecast-bucket ({})",
                humantime::format_duration(self.forecast_season),
                humantime::format_duration(self.forecast_bucket)
            )));
        }
        let config = CapacityConfig {
            bucket_ms,
            season_buckets: u32::try_from(season_ms / bucket_ms).unwrap_or(u32::MAX),
            wait_target_ms: duration_ms(self.wait_target),
            stage_wait_targets,
            band_wait_targets,
            wait_quantile: self.wait_quantile,
            lead_time_ms: duration_ms(self.lead_time),
            scale_down_window_ms: duration_ms(self.scale_down_window),
            min_workers: self.min_workers,
            max_workers: self.max_workers,
            ..CapacityConfig::default()
        };
        config.validate().map_err(|e| ConfigError(e.to_string()))?;
        Ok(config)
    }
}

impl CoordinatorArgs {
    /// The HTTP server's limits, validated.
    fn http(&self) -> Result<crate::http::HttpConfig, ConfigError> {
        let allowed_hosts =
            crate::http::hosts::AllowedHosts::parse(&self.allowed_hosts).map_err(ConfigError)?;
        for (flag, n, min, max) in [
            (
                "--http-max-connections",
                self.http_max_connections,
                16,
                100_000,
            ),
            (
                "--http-max-event-streams",
                self.http_max_event_streams,
                1,
                10_000,
            ),
        ] {
            if !(min..=max).contains(&n) {
                return Err(ConfigError(format!(
                    "{flag} must be between {min} and {max} (got {n})"
                )));
            }
        }
        for (flag, d, min_ms, max_s) in [
            (
                "--http-header-timeout",
                self.http_header_timeout,
                1_000,
                600,
            ),
            ("--http-idle-timeout", self.http_idle_timeout, 2_000, 3_600),
            ("--http-body-timeout", self.http_body_timeout, 1_000, 3_600),
            ("--broker-timeout", self.broker_timeout, 50, 600),
        ] {
            let (min, max) = (Duration::from_millis(min_ms), Duration::from_secs(max_s));
            if d < min || d > max {
                return Err(ConfigError(format!(
                    "{flag} must be between {} and {} (got {})",
                    humantime::format_duration(min),
                    humantime::format_duration(max),
                    humantime::format_duration(d)
                )));
            }
        }
        Ok(crate::http::HttpConfig {
            max_connections: self.http_max_connections,
            header_timeout: self.http_header_timeout,
            idle_timeout: self.http_idle_timeout,
            body_timeout: self.http_body_timeout,
            max_event_streams: self.http_max_event_streams,
            broker_timeout: self.broker_timeout,
            allowed_hosts,
        })
    }
}

/// An optional http(s) URL flag, validated.
fn http_url(flag: &str, url: Option<&str>) -> Result<Option<String>, ConfigError> {
    let Some(url) = url else {
        return Ok(None);
    };
    let ok = reqwest::Url::parse(url)
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if ok {
        Ok(Some(url.to_owned()))
    } else {
        Err(ConfigError(format!(
            "{flag} must be an http:// or https:// URL (got '{url}')"
        )))
    }
}

fn valid_max_age(s: &str) -> bool {
    let Some(unit) = s.chars().last() else {
        return false;
    };
    let digits = &s[..s.len() - unit.len_utf8()];
    matches!(unit, 'Y' | 'M' | 'D' | 'h' | 'm' | 's')
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `guildhall serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Coordinator.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// `guildhall demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Coordinator.
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
    /// Tasks fed per second.
    #[arg(long, default_value_t = 4.0)]
    pub rate: f64,
    /// Agents per stage.
    #[arg(long, default_value_t = 2)]
    pub agents_per_stage: u32,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Delete the demo's queues and stream when it stops.
    #[arg(long)]
    pub clean: bool,
}

/// `guildhall submit`.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The stage to queue the task on.
    #[arg(long)]
    pub stage: String,
    /// The task's id (default: a new UUIDv7).
    #[arg(long)]
    pub id: Option<String>,
    /// The payload: text, or @FILE to read a file, or @- for standard input.
    #[arg(long, default_value = "")]
    pub payload: String,
    /// Create the stage's queue if it does not exist yet.
    #[arg(long)]
    pub declare: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep submitting, as a Poisson stream of this many tasks per second
    /// (0.001 to 1000), until stopped (SIGTERM, Ctrl-C) or `--count` is
    /// reached: a load generator. Each task gets a new id.
    #[arg(long, env = "GUILDHALL_SUBMIT_RATE")]
    pub rate: Option<f64>,
    /// Submit this many tasks (1 to 100000000), back to back unless `--rate`
    /// spaces them. Each task gets a new id.
    #[arg(long, env = "GUILDHALL_SUBMIT_COUNT")]
    pub count: Option<u64>,
    /// The task's priority, 0-9, higher first (default 0).
    #[arg(long, allow_hyphen_values = true)]
    pub priority: Option<String>,
    /// Hold the task back this long before it can start (`90s`, `5m`,
    /// `2h`; at most about 97 days).
    #[arg(long, allow_hyphen_values = true)]
    pub delay: Option<String>,
    /// Hold the task back until this time (RFC 3339 in UTC,
    /// `2026-12-07T09:00:00Z`).
    #[arg(long, allow_hyphen_values = true)]
    pub at: Option<String>,
    /// Hold the task until this task has finished (repeatable, or ids
    /// separated by commas; at most 64). The task is then submitted
    /// through the coordinator's API (--api-url), which holds it.
    #[arg(long, value_name = "ID", allow_hyphen_values = true)]
    pub after: Vec<String>,
    /// With --after: what a dependency that is dead-lettered or cancelled
    /// does to this task: `fail` (it is dead-lettered too, the default) or
    /// `run` (it runs anyway).
    #[arg(long, value_name = "fail|run")]
    pub on_dependency_failure: Option<String>,
    /// With --after: the coordinator's HTTP address.
    #[arg(
        long,
        env = "GUILDHALL_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api_url: String,
    /// With --after: the coordinator's --api-token, if it has one.
    #[arg(long, env = "GUILDHALL_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
}

/// `guildhall healthcheck`: for a container's HEALTHCHECK, so an image needs
/// no curl.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The URL to GET; any 2xx answer is healthy.
    #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
    pub url: String,
    /// Longest the check may take.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Flags of commands that read a running coordinator's API.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Broker (accepted for uniformity; these commands read the API).
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The coordinator's HTTP address.
    #[arg(
        long,
        env = "GUILDHALL_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api_url: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// The coordinator's --api-token, if it has one.
    #[arg(long, env = "GUILDHALL_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
}

/// `guildhall trace`.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// API access.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The task's id.
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn serve(args: &[&str]) -> Result<(ServeConfig, SocketAddr), ConfigError> {
        let mut argv = vec!["guildhall", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(s) => s.coordinator.validate(&s.broker),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_validate() {
        let (config, listen) = serve(&[]).unwrap();
        assert_eq!(listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.names.events_stream(), "guildhall.events");
        assert_eq!(config.core.missed_heartbeats, 3);
        assert!(config.management_url.is_some());
        assert_eq!(config.data_dir, None);
        assert_eq!(config.snapshot_interval, Duration::from_secs(10));
        assert_eq!(config.http.max_connections, 1024);
        assert_eq!(config.http.header_timeout, Duration::from_secs(10));
        assert!(!config.http.allowed_hosts.any());
        let (config, _) = serve(&[
            "--allowed-hosts",
            "coordinator,*.svc",
            "--allowed-hosts",
            "*",
        ])
        .unwrap();
        assert!(config.http.allowed_hosts.allows("coordinator:8080"));
        assert!(config.http.allowed_hosts.any());
    }

    #[test]
    fn a_data_dir_is_created_and_must_be_writable() {
        let dir =
            std::env::temp_dir().join(format!("guildhall-cli-{:08x}/data", rand::random::<u32>()));
        let d = dir.display().to_string();
        let (config, _) = serve(&["--data-dir", &d, "--snapshot-interval", "1s"]).unwrap();
        assert_eq!(config.data_dir.as_deref(), Some(dir.as_path()));
        assert_eq!(config.snapshot_interval, Duration::from_secs(1));
        assert!(dir.is_dir());
        let (config, _) = serve(&["--data-dir", ""]).unwrap();
        assert_eq!(config.data_dir, None);
        let file = dir.join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let f = file.join("sub").display().to_string();
        let err = serve(&["--data-dir", &f]).unwrap_err().to_string();
        assert!(err.starts_with("--data-dir: cannot write in "), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn strong_mode_trusts_agents_own_users_the_listed_ones_and_its_own() {
        let (config, _) = serve(&[]).unwrap();
        assert_eq!(config.event_users, None, "off by default");
        let (config, _) = serve(&[
            "--require-user-id",
            "--trusted-users",
            "producer, loadgen",
            "--amqp-url",
            "amqp://coordinator:pw@127.0.0.1:5672/%2f",
        ])
        .unwrap();
        let users = config.event_users.expect("strong mode");
        assert!(
            users.allows(Some("build-1"), "build-1"),
            "an agent's own user"
        );
        assert!(
            !users.allows(Some("build-2"), "build-1"),
            "another agent's user"
        );
        assert!(!users.allows(None, "build-1"), "no user_id");
        for trusted in ["producer", "loadgen", "coordinator"] {
            assert!(users.allows(Some(trusted), "submit-1"), "{trusted}");
        }
        // A URL without a user names none to trust.
        let (config, _) = serve(&["--require-user-id", "--amqp-url", "amqp://127.0.0.1"]).unwrap();
        let users = config.event_users.expect("strong mode");
        assert!(!users.allows(Some("guest"), "x"));
    }

    #[test]
    fn several_broker_and_management_urls_by_repeating_or_commas() {
        let a = "amqp://guest:s3cret@node1:5672/%2f";
        let b = "amqp://guest:s3cret@node2:5672/%2f";
        let (config, _) = serve(&["--amqp-url", a, "--amqp-url", b]).unwrap();
        assert_eq!(config.amqp_url.len(), 2);
        let (config, _) = serve(&["--amqp-url", &format!("{a},{b}")]).unwrap();
        let hosts: Vec<&str> = config.amqp_url.iter().map(|u| u.host()).collect();
        assert_eq!(hosts, ["node1", "node2"]);
        let (config, _) = serve(&[
            "--management-url",
            "http://guest:guest@node1:15672",
            "--management-url",
            "http://guest:guest@node2:15672,http://guest:guest@node3:15672",
        ])
        .unwrap();
        assert_eq!(
            config
                .management_url
                .as_deref()
                .map(|u| u.split(',').count()),
            Some(3)
        );
        // A bad second address: one line, naming the flag and the entry,
        // without any password (the first address's included).
        for bad in [
            format!("{a},amqp://guest:s3cret@node2:port/%2f"),
            format!("{a},"),
            "amqp://guest:s3,cret@node1/%2f".to_owned(),
        ] {
            let err = serve(&["--amqp-url", &bad]).unwrap_err().to_string();
            assert!(err.starts_with("--amqp-url: invalid AMQP URL"), "{err}");
            assert!(!err.contains("s3"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = serve(&[
            "--management-url",
            "http://u:s3cret@n1:15672,ftp://u:s3cret@n2",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("--management-url: "), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn bad_values_give_one_line_naming_the_flag() {
        for (args, needle) in [
            (vec!["--listen", "nowhere"], "--listen"),
            (vec!["--namespace", "a.b"], "--namespace"),
            (vec!["--amqp-url", "http://x"], "--amqp-url"),
            (vec!["--missed-heartbeats", "0"], "--missed-heartbeats"),
            (vec!["--suspect-heartbeats", "3"], "--suspect-heartbeats"),
            (vec!["--alert-webhook", "slack"], "--alert-webhook"),
            (vec!["--scale-webhook", "ftp://x"], "--scale-webhook"),
            (vec!["--scale-command", " "], "--scale-command"),
            (vec!["--stage-wait-target", "build"], "--stage-wait-target"),
            (vec!["--stage-wait-target", "a.b=1s"], "--stage-wait-target"),
            (
                vec!["--stage-wait-target", "build=soon"],
                "--stage-wait-target",
            ),
            (vec!["--forecast-bucket", "7m"], "--forecast-season"),
            (vec!["--wait-quantile", "1.5"], "quantile"),
            (vec!["--wait-target", "0s"], "wait"),
            (vec!["--sync-period", "0s"], "--sync-period"),
            (vec!["--prefetch-cap", "0"], "--prefetch-cap"),
            (vec!["--stream-prefetch", "0"], "--stream-prefetch"),
            (vec!["--stream-prefetch", "70000"], "--stream-prefetch"),
            (vec!["--queue-poll", "1ms"], "--queue-poll"),
            (vec!["--stream-max-age", "7 days"], "--stream-max-age"),
            (vec!["--stream-max-bytes", "10"], "--stream-max-bytes"),
            (vec!["--management-url", "ftp://x"], "--management-url"),
            (vec!["--snapshot-interval", "500ms"], "--snapshot-interval"),
            (vec!["--snapshot-interval", "2h"], "--snapshot-interval"),
            (vec!["--data-dir", "/dev/null/guildhall"], "--data-dir"),
            (vec!["--api-token", "short"], "--api-token"),
            (vec!["--api-token", "has a space in it ok"], "--api-token"),
            (vec!["--protect-reads"], "--protect-reads"),
            (vec!["--trusted-users", "producer"], "--trusted-users"),
            (
                vec!["--error-classes-per-stage", "0"],
                "--error-classes-per-stage",
            ),
            (vec!["--allowed-hosts", "a b"], "--allowed-hosts"),
            (vec!["--allowed-hosts", "ok,http://x"], "--allowed-hosts"),
            (
                vec!["--http-max-connections", "1"],
                "--http-max-connections",
            ),
            (
                vec!["--http-max-event-streams", "0"],
                "--http-max-event-streams",
            ),
            (
                vec!["--http-header-timeout", "100ms"],
                "--http-header-timeout",
            ),
            (vec!["--http-idle-timeout", "1s"], "--http-idle-timeout"),
            (vec!["--http-body-timeout", "2h"], "--http-body-timeout"),
            (vec!["--broker-timeout", "10ms"], "--broker-timeout"),
        ] {
            let err = serve(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let (config, _) = serve(&["--management-url", ""]).unwrap();
        assert!(config.management_url.is_none());
    }
}
